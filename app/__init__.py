"""The cohort pipeline, job runner, REST service and the ``synthcohort`` CLI."""
