# Storage and least-privilege access for tkllm-ray on AWS: one versioned, encrypted, private S3 bucket
# with four prefixes, and one IAM role per workload:
#   ingest   reads raw/ (post exports), writes datasets/
#   trainer  reads datasets/ and models/, reads and writes deltas/ (versions, checkpoints, LATEST)
#   server   reads deltas/ and models/, writes nothing
# Each role is assumable by EC2 (an instance profile, for cluster/launcher-aws.yaml) and, when
# eks_oidc_provider_arn is set, by its Kubernetes service account (IRSA).

terraform {
  required_version = ">= 1.5"
  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.0"
    }
  }
}

provider "aws" {
  region = var.region
}

locals {
  bucket_arn = aws_s3_bucket.data.arn
  workloads = {
    ingest  = { policy = data.aws_iam_policy_document.ingest.json, service_account = "tkllm-ingest" }
    trainer = { policy = data.aws_iam_policy_document.trainer.json, service_account = "tkllm-trainer" }
    server  = { policy = data.aws_iam_policy_document.server.json, service_account = "tkllm-server" }
  }
}

# ---- the bucket ---------------------------------------------------------------------------------

resource "aws_s3_bucket" "data" {
  bucket = var.bucket_name
}

resource "aws_s3_bucket_versioning" "data" {
  bucket = aws_s3_bucket.data.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

resource "aws_s3_bucket_public_access_block" "data" {
  bucket                  = aws_s3_bucket.data.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_ownership_controls" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_lifecycle_configuration" "data" {
  bucket = aws_s3_bucket.data.id
  rule {
    id     = "expire-old-versions"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }
  depends_on = [aws_s3_bucket_versioning.data]
}

data "aws_iam_policy_document" "tls_only" {
  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [local.bucket_arn, "${local.bucket_arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }
}

resource "aws_s3_bucket_policy" "data" {
  bucket     = aws_s3_bucket.data.id
  policy     = data.aws_iam_policy_document.tls_only.json
  depends_on = [aws_s3_bucket_public_access_block.data]
}

# ---- what each workload may do ------------------------------------------------------------------

data "aws_iam_policy_document" "ingest" {
  statement {
    sid       = "ListRawAndDatasets"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["raw", "raw/*", "datasets", "datasets/*"]
    }
  }
  statement {
    sid       = "ReadRawAndDatasets"
    actions   = ["s3:GetObject"]
    resources = ["${local.bucket_arn}/raw/*", "${local.bucket_arn}/datasets/*"]
  }
  statement {
    sid       = "WriteDatasets"
    actions   = ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.bucket_arn}/datasets/*"]
  }
}

data "aws_iam_policy_document" "trainer" {
  statement {
    sid       = "ListDatasetsModelsDeltas"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["datasets", "datasets/*", "models", "models/*", "deltas", "deltas/*"]
    }
  }
  statement {
    sid     = "ReadDatasetsModelsDeltas"
    actions = ["s3:GetObject"]
    resources = ["${local.bucket_arn}/datasets/*", "${local.bucket_arn}/models/*",
    "${local.bucket_arn}/deltas/*"]
  }
  statement {
    # New versions, per-account checkpoints under the run directory, the LATEST pointer; an
    # interrupted publish is discarded (DeleteObject) before the account is retrained.
    sid       = "WriteDeltas"
    actions   = ["s3:PutObject", "s3:DeleteObject", "s3:AbortMultipartUpload"]
    resources = ["${local.bucket_arn}/deltas/*"]
  }
}

data "aws_iam_policy_document" "server" {
  statement {
    sid       = "ListDeltasModels"
    actions   = ["s3:ListBucket"]
    resources = [local.bucket_arn]
    condition {
      test     = "StringLike"
      variable = "s3:prefix"
      values   = ["deltas", "deltas/*", "models", "models/*"]
    }
  }
  statement {
    sid       = "ReadDeltasModels"
    actions   = ["s3:GetObject"]
    resources = ["${local.bucket_arn}/deltas/*", "${local.bucket_arn}/models/*"]
  }
}

# ---- roles --------------------------------------------------------------------------------------

data "aws_iam_policy_document" "assume" {
  for_each = local.workloads
  statement {
    sid     = "Ec2InstanceProfile"
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
  dynamic "statement" {
    for_each = var.eks_oidc_provider_arn == "" ? [] : [each.value.service_account]
    content {
      sid     = "KubernetesServiceAccount"
      actions = ["sts:AssumeRoleWithWebIdentity"]
      principals {
        type        = "Federated"
        identifiers = [var.eks_oidc_provider_arn]
      }
      condition {
        test     = "StringEquals"
        variable = "${var.eks_oidc_issuer}:sub"
        values   = ["system:serviceaccount:${var.k8s_namespace}:${statement.value}"]
      }
      condition {
        test     = "StringEquals"
        variable = "${var.eks_oidc_issuer}:aud"
        values   = ["sts.amazonaws.com"]
      }
    }
  }
}

resource "aws_iam_policy" "workload" {
  for_each    = local.workloads
  name        = "${var.name_prefix}-${each.key}-s3"
  description = "tkllm-ray ${each.key}: S3 access to ${var.bucket_name}"
  policy      = each.value.policy
}

resource "aws_iam_role" "workload" {
  for_each           = local.workloads
  name               = "${var.name_prefix}-${each.key}"
  assume_role_policy = data.aws_iam_policy_document.assume[each.key].json
}

resource "aws_iam_role_policy_attachment" "workload" {
  for_each   = local.workloads
  role       = aws_iam_role.workload[each.key].name
  policy_arn = aws_iam_policy.workload[each.key].arn
}

resource "aws_iam_instance_profile" "workload" {
  for_each = local.workloads
  name     = "${var.name_prefix}-${each.key}"
  role     = aws_iam_role.workload[each.key].name
}
