"""Names the cluster specs set and the job client reads back, kept light to import."""

import re

# The label on the pipeline's workflows (`list` selects by it) and on its base resources.
PART_OF = {"app.kubernetes.io/part-of": "mlops-pipeline"}
TRAINER_CONTAINER = "pytorch"  # the Training Operator requires this name
WORKFLOW_LABEL = "workflows.argoproj.io/workflow"

# A pipeline run's id is one folder under models/NAME/: a local run-... id, an Argo workflow's
# name or KFP's run id. A '/' nests it, and S3's client refuses a '.' or '..' segment.
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def run_id_error(run_id: str) -> str | None:
    """Why run_id names no run folder, or None."""
    if RUN_ID.fullmatch(run_id):
        return None
    return f"{run_id!r} is not a run id: letters, digits, '-', '_' and '.', a letter or digit first"
