#!/usr/bin/env bash
# Creates the two instance profiles cluster.yaml names, with least-privilege policies:
#   wsss-node: read s3://BUCKET/PREFIX/data/, read/write s3://BUCKET/PREFIX/{runs,sweeps}/
#   wsss-head: the same, plus the autoscaler's EC2 rights (deploy/aws/head-policy.json)
# Usage: deploy/aws/create-iam.sh BUCKET [PREFIX=wsss] [CLUSTER=wsss]
# Needs the aws CLI with rights to create IAM roles. Run once per account; it stops at the
# first error (e.g. a role of that name exists already).
set -euo pipefail
BUCKET=${1:?usage: create-iam.sh BUCKET [PREFIX] [CLUSTER]}
PREFIX=${2:-wsss}
CLUSTER=${3:-wsss}
here=$(cd "$(dirname "$0")" && pwd)
filled=$(mktemp -d)
trap 'rm -rf "$filled"' EXIT
for policy in node-policy head-policy; do
  sed -e "s|BUCKET|$BUCKET|g" -e "s|PREFIX|$PREFIX|g" -e "s|CLUSTER|$CLUSTER|g" \
    "$here/$policy.json" > "$filled/$policy.json"
done

for role in wsss-node wsss-head; do
  aws iam create-role --role-name "$role" \
    --assume-role-policy-document "file://$here/trust-ec2.json" > /dev/null
  aws iam put-role-policy --role-name "$role" --policy-name wsss-s3 \
    --policy-document "file://$filled/node-policy.json"
  aws iam create-instance-profile --instance-profile-name "$role" > /dev/null
  aws iam add-role-to-instance-profile --instance-profile-name "$role" --role-name "$role"
done
aws iam put-role-policy --role-name wsss-head --policy-name wsss-autoscaler \
  --policy-document "file://$filled/head-policy.json"
echo "instance profiles wsss-head and wsss-node: s3://$BUCKET/$PREFIX/{data (read),runs,sweeps}"
