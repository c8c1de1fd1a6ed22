# The MLflow tracking server image for production: the official image plus the PostgreSQL driver and boto3
# (the official image carries neither). Build and push it, then reference it in k8s/mlflow.yaml:
#   docker build -f infra/production/mlflow.Dockerfile -t <registry>/cl-mlflow:3.17.2 infra/production
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "psycopg2-binary>=2.9" "boto3>=1.34"
