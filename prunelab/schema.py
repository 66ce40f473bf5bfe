"""Every MLflow name prunelab writes or reads: experiment and run names, tags, params, per-round
metric names and artifact paths. The sweeps write with these names and `analysis/` reads with them,
so the two cannot drift apart; docs/results.md says what each one holds. Torch-free (stdlib and
`prunelab.metrics` only), so the analysis side imports it freely.
"""

from __future__ import annotations

import re

from prunelab.metrics import PRIMARY_BN_PARAM, accuracy_name  # noqa: F401 - PRIMARY_BN_PARAM re-exported

# -- experiment and runs ---------------------------------------------------------------------------
EXPERIMENT_FORMAT = "prunelab-{figure}"  # the default experiment of a figure's sweep
RUN_NAME_FORMAT = "{figure}-{preset}"  # the Tune run; the parent MLflow run adds a time stamp
# MLflow 3's experiment type (its UI asks for one when unset); prunelab's are classic training runs
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # an experiment's (or run's) description in the UI


def experiment_name(figure: str) -> str:
    """`prunelab-<figure>`, the experiment a figure's sweep logs to unless told another."""
    return EXPERIMENT_FORMAT.format(figure=figure)


def parent_run_name(figure: str, preset: str, stamp: str) -> str:
    """`<figure>-<preset>-<stamp>`, the name of a sweep's parent run."""
    return f"{RUN_NAME_FORMAT.format(figure=figure, preset=preset)}-{stamp}"


# -- tags ------------------------------------------------------------------------------------------
PARENT_TAG = "mlflow.parentRunId"  # on a chain run: its sweep run
ROLE_TAG = "prunelab.role"
ROLE_SWEEP, ROLE_CHAIN = "sweep", "chain"
FIGURE_TAG = "prunelab.figure"
PRESET_TAG = "prunelab.preset"
GIT_COMMIT_TAG = "prunelab.git_commit"
# MLflow's own source tags (the UI shows them as the run's source and commit), and whether the
# checkout had uncommitted changes to tracked files
SOURCE_COMMIT_TAG = "mlflow.source.git.commit"
SOURCE_NAME_TAG = "mlflow.source.name"
SOURCE_TYPE_TAG = "mlflow.source.type"
GIT_DIRTY_TAG = "prunelab.git_dirty"
CHAIN_HASH_TAG = "prunelab.chain_hash"
TRIAL_KEY_TAG = "prunelab.trial_key"
VARIANT_TAG = "prunelab.variant"
STATUS_TAG = "prunelab.status"
STATUS_RUNNING, STATUS_FINISHED, STATUS_FAILED, STATUS_KILLED = "running", "finished", "failed", "killed"
# MLflow's terminal run status -> the value of STATUS_TAG
RUN_STATUS = {"FINISHED": STATUS_FINISHED, "FAILED": STATUS_FAILED, "KILLED": STATUS_KILLED}
FAILURE_TAG = "prunelab.failure"  # the reason a chain failed
FAILURE_MAX_CHARS = 5000
REUSED_BY_TAG = "prunelab.reused_by"  # on a chain run: the latest sweep run that reused it without computing
NODE_ID_TAG = "prunelab.node_id"  # the Ray node of the latest attempt
RESOURCES_TAG = "prunelab.resources"  # JSON: the Ray resources it was given (one worker's, when data-parallel)
WORKERS_TAG = "prunelab.workers"  # the data-parallel workers (Ray Train's world size) of the latest attempt
UNKNOWN_COMMIT = "unknown"


def tag_filter(key: str, value: str) -> str:
    """The `search_runs` filter for runs whose tag `key` is `value`."""
    return f"tags.`{key}` = '{value}'"


# -- params ----------------------------------------------------------------------------------------
# parent run
PRESET_PARAM = "preset"
TRIALS_PARAM = "trials"
# chain run: the flattened chain config (dotted keys), plus these two
EVAL_ROUNDS_PARAM = "eval.rounds"  # comma-separated
# PRIMARY_BN_PARAM (from prunelab.metrics): the BN mode of the plain barrier names
# chain config keys that analysis/ reads
DATASET_PARAM = "dataset.name"
DATASET_TRAIN_SIZE_PARAM = "dataset.train_size"
MODEL_PARAM = "model.name"
SEED_PARAM = "seed"
SEED_SCOPE_PARAM = "seed_scope"
VARIANT_PARAM = "variant"
START_ROUND_PARAM = "start_round"
START_IPC_PARAM = "start_from.pruning_data.ipc"
PRUNING_KIND_PARAM = "pruning_data.kind"
PRUNING_IPC_PARAM = "pruning_data.ipc"
REWIND_EPOCH_PARAM = "pruning.rewind_epoch"
METHOD_PARAM = "pruning.method"  # magnitude (IMP, distilled pruning) or a source at initialization
SCOPE_PARAM = "pruning.scope"
FRACTION_PARAM = "pruning.fraction"
ROUNDS_PARAM = "pruning.rounds"
MODEL_WIDTH_PARAM = "model.width"
TRAINING_LR_PARAM, TRAINING_EPOCHS_PARAM = "training.lr", "training.epochs"
PRUNING_LR_PARAM, PRUNING_EPOCHS_PARAM = "pruning_training.lr", "pruning_training.epochs"

# -- metrics (step = pruning round) ----------------------------------------------------------------
SPARSITY = "sparsity"
PRUNED_SPARSITY = "pruned_sparsity"
PRUNING_ACCURACY = "pruning_accuracy"
PRUNING_TRAIN_LOSS = "pruning_train_loss"
PRUNING_SET_SIZE = "pruning_set_size"
PRUNING_IMAGES_SEEN = "pruning_images_seen"
EVAL_SPARSITY = "eval_sparsity"
TEST_ACCURACY = accuracy_name()
TEST_LOSS, TRAIN_LOSS = "test_loss", "train_loss"
HESSIAN_STATS = ("min", "max", "mean", "std", "abs_mean", "top_eigenvalue")
# inside a round (step = epochs of pruning-data training since the chain began: round x epochs per
# round + epoch), logged at most every few seconds while the round trains; progress only, the
# round's metrics above are the results
PROGRESS_TRAIN_LOSS = "progress/train_loss"
PROGRESS_ROUND = "progress/round"
# a step's metrics go in one batch with its sentinel, so a logged sentinel means a logged step
ROUND_SENTINEL = PRUNING_ACCURACY
EVAL_SENTINEL = EVAL_SPARSITY


def hessian_metric(stat: str) -> str:
    """`hessian_<stat>`, one of HESSIAN_STATS."""
    return f"hessian_{stat}"


LMC_CURVE_PREFIX = "lmc_curve"


def lmc_curve_metric(r: int, bn_mode: str, curve: str) -> str:
    """One LMC curve of round r as a metric series, one step per α (step i = the i-th α of the
    curve's `alphas`), so the UI overlays it across chains: `lmc_curve/r04/interpolate/train_loss`."""
    return f"{LMC_CURVE_PREFIX}/r{r:02d}/{bn_mode}/{curve}"


def lmc_curve_records(lmc: dict, r: int, primary_mode: str = "interpolate") -> tuple[list[tuple[int, dict]], str]:
    """The (step, metrics) records of round r's LMC curves (every BN mode stored, else the primary
    curve as `primary_mode`) and the sentinel metric that marks a step logged."""
    n = len(lmc.get("alphas") or [])
    modes = lmc.get("by_bn_mode") or {primary_mode: lmc}
    series = {lmc_curve_metric(r, mode, k): v for mode, curves in modes.items() for k, v in curves.items()
              if k.endswith(("_loss", "_accuracy")) and isinstance(v, list) and len(v) == n}
    records = [(i, {name: float(v[i]) for name, v in series.items()}) for i in range(n)]
    sentinel = min(series) if series else lmc_curve_metric(r, primary_mode, "none")
    return records, sentinel


def round_metrics(rec: dict) -> dict:
    """The history record of a round in the names of docs/results.md."""
    return {SPARSITY: rec["trained_sparsity"], PRUNED_SPARSITY: rec["sparsity"],
            PRUNING_ACCURACY: rec["pruning_accuracy"], PRUNING_TRAIN_LOSS: rec["pruning_train_loss"],
            PRUNING_SET_SIZE: rec["pruning_set_size"], PRUNING_IMAGES_SEEN: rec["pruning_images_seen"]}


# -- artifacts -------------------------------------------------------------------------------------
SWEEP_CONFIG = "sweep/config.yaml"  # parent run: the resolved sweep config
SWEEP_TRIALS = "sweep/trials.json"  # parent run: every trial the sweep asked for, with run ids
FIGURES_DIR = "figures"  # parent run: figures, tables and the report
LMC_DIR, HESSIAN_DIR, LANDSCAPE_DIR, MASKS_DIR = "lmc", "hessian", "landscape", "masks"
SPECTRUM_DIR = "spectrum"
CORRUPT_STATE_NOTE = "warnings/corrupt_state.txt"
LAST_ERROR_NOTE = "warnings/last_error.txt"
ROUND_FILE_RE = re.compile(r"round_(\d+)\.(json|npz|pt)$")  # the rounds analysis/ lists in a folder


def round_file(r: int, ext: str) -> str:
    """`round_XX.<ext>`: a round's file name in every per-round artifact folder."""
    return f"round_{r:02d}.{ext}"


def lmc_artifact(r: int) -> str:
    return f"{LMC_DIR}/{round_file(r, 'json')}"


def spectrum_artifact(r: int) -> str:
    """The eigenvalue density, top eigenvalues and trace of round r (evaluation.spectrum)."""
    return f"{SPECTRUM_DIR}/{round_file(r, 'json')}"


def hessian_artifact(r: int) -> str:
    return f"{HESSIAN_DIR}/{round_file(r, 'json')}"


def landscape_artifact(r: int) -> str:
    return f"{LANDSCAPE_DIR}/{round_file(r, 'npz')}"


def mask_artifact(r: int) -> str:
    """A round's mask as a plain PyTorch file (`torch.load` gives name -> bool tensor); its sha256
    beside it in `mask_checksum_artifact(r)`."""
    return f"{MASKS_DIR}/{round_file(r, 'pt')}"


WEIGHTS_DIR = "weights"
# a chain's dense initialization (and its rewind point when k > 0), plain PyTorch state dicts, each
# with its sha256 beside it (`<file>.sha256`)
INIT_WEIGHTS_ARTIFACT = f"{WEIGHTS_DIR}/init.pt"
REWIND_WEIGHTS_ARTIFACT = f"{WEIGHTS_DIR}/rewind.pt"


def mask_checksum_artifact(r: int) -> str:
    return f"{MASKS_DIR}/{round_file(r, 'pt')}.sha256"

