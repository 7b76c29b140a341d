variable "region" {
  description = "AWS region of the bucket (and of the Ray cluster that uses it)."
  type        = string
  default     = "us-east-1"
}

variable "bucket_name" {
  description = "Name of the S3 bucket holding raw/ (post exports), datasets/, deltas/ and models/. Globally unique."
  type        = string
}

variable "name_prefix" {
  description = "Prefix of the IAM role, policy and instance profile names."
  type        = string
  default     = "tkllm"
}

variable "noncurrent_version_days" {
  description = "Days a replaced or deleted object version is kept before it expires (versioning is on)."
  type        = number
  default     = 30
}

variable "eks_oidc_provider_arn" {
  description = "ARN of an EKS cluster's IAM OIDC provider: when set, the roles can also be assumed by the Kubernetes service accounts below (IRSA). Empty: EC2 instance profiles only."
  type        = string
  default     = ""
}

variable "eks_oidc_issuer" {
  description = "That provider's issuer host and path, without https:// (e.g. oidc.eks.us-east-1.amazonaws.com/id/EXAMPLE)."
  type        = string
  default     = ""
}

variable "k8s_namespace" {
  description = "Kubernetes namespace of the service accounts tkllm-trainer, tkllm-server and tkllm-ingest (IRSA)."
  type        = string
  default     = "default"
}
