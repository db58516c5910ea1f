"""MLflow "models from code" entry of facelab's pyfunc flavour (see :mod:`facelab.serve.pyfunc`).

MLflow executes this file when it loads a registered facelab model; it only names the model class.
No other module imports it.
"""

from mlflow.models import set_model

from facelab.serve.pyfunc import FacelabPyfunc

set_model(FacelabPyfunc())
