output "bucket" {
  description = "The data bucket: s3://BUCKET/raw/, datasets/, deltas/, models/."
  value       = aws_s3_bucket.data.bucket
}

output "bucket_arn" {
  value = aws_s3_bucket.data.arn
}

output "role_arns" {
  description = "IAM role per workload (trainer, server, ingest)."
  value       = { for k, r in aws_iam_role.workload : k => r.arn }
}

output "instance_profile_arns" {
  description = "EC2 instance profile per workload, for cluster/launcher-aws.yaml's IamInstanceProfile."
  value       = { for k, p in aws_iam_instance_profile.workload : k => p.arn }
}
