"""Names the cluster specs set and the job client reads back, kept light to import."""

# The label on the pipeline's workflows (`list` selects by it) and on its base resources.
PART_OF = {"app.kubernetes.io/part-of": "mlops-pipeline"}
TRAINER_CONTAINER = "pytorch"  # the Training Operator requires this name
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"
