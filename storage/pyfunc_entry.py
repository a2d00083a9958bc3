"""MLflow "models from code" entry point: MLflow runs this file to get the model object, not a pickle."""

import mlflow

from patchline.storage.pyfunc_model import PatchlineModel

mlflow.models.set_model(PatchlineModel())
