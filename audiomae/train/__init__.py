"""Training, fine-tuning, evaluation and embedding loops."""
from .loop import TrainingError, evaluate, finetune, linear_probe, pretrain  # noqa: F401
from .metrics import average_precision, d_prime, multilabel_metrics, roc_auc, singlelabel_metrics  # noqa: F401
from .optim import layer_id, lr_at, param_groups  # noqa: F401
