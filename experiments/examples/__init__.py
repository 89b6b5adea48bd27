"""A worked example of `experiment=audit`: a model module written as a user would, on a real table."""
