"""Settings of the local S3 server (moto) the remote-run-directory tests write to."""

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "moto-secret-value",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def s3_uri(endpoint: str, name: str) -> str:
    return f"s3://runs/{name}?endpoint_override={endpoint}&scheme=http&region=us-east-1"
