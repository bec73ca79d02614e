"""`lstmeng demo`: train an lstmeng model on a task that needs long-term memory.

Two synthetic tasks, both with variable-length sequences (right padding and a
mask), both learned by the same model::

    Bidirectional(LSTM(H1, return_sequences=True)) -> LSTM(H2) -> dense head

- ``adding``: the adding problem of Hochreiter & Schmidhuber (1997). Each step
  holds a value drawn from U(0, 1) and a marker; exactly two steps are marked,
  one in each half of the sequence's real part, and the target is the sum of
  the two marked values. Always predicting the mean (1.0) scores the variance of
  that sum, 1/6 ~ 0.167 MSE; the demo must get below 0.01.
- ``sentiment``: token sequences like a movie review. An opinion word ("good" or
  "bad") appears among the first few tokens; the last few tokens hold a
  verdict word, "indeed" or "not", in two thirds of the reviews, filler words
  everywhere else. The label is the opinion, flipped by "not". The opinion
  alone scores 2/3, the verdict alone 1/2: above 90% needs both ends, so the
  model must carry one end's token across the whole filler. Tokens go through
  an embedding table trained with the model.

Only NumPy and lstmeng's public pieces are used: ``le.Embedding``, ``le.Dense``,
``le.Sequential``, ``le.losses`` and ``le.optim`` (Adam, gradient clipping).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable

import numpy as np

import lstmeng as le
from lstmeng import optim
from lstmeng._runtime import threads
from lstmeng.backends import registry
from lstmeng.training import _progress_bar  # the same per-epoch bar as le.fit

TASKS = ("adding", "sentiment")

# The demo's matrices are small ([32, 16] @ [16, 64] per step): there BLAS
# threads cost more in hand-offs than they save, and on a busy machine they
# can make a step many times slower.
DEFAULT_BLAS_THREADS = 1
#: Largest global gradient norm of a training step (larger gradients are scaled down).
GRADIENT_CLIP_NORM = 1.0


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss."""


# -- data ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Dataset:
    """One split of a task.

    Attributes:
        inputs: ``[N, T, 2]`` float32 (adding) or ``[N, T]`` int64 token ids (sentiment).
        mask: bool ``[N, T]``, True at real steps (right padding).
        targets: ``[N, 1]`` float32: the sum (adding) or the label 0/1 (sentiment).
    """

    inputs: np.ndarray
    mask: np.ndarray
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, rows: np.ndarray) -> "Dataset":
        """The rows ``rows``, trimmed to the longest of them (less padding to compute)."""
        mask = self.mask[rows]
        steps = int(mask.sum(axis=1).max()) if len(rows) else 0
        return Dataset(self.inputs[rows][:, :steps], mask[:, :steps], self.targets[rows])


def _draw_lengths(count: int, min_length: int, max_length: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(min_length, max_length + 1, size=count)


def make_adding(count: int, rng: np.random.Generator, min_length: int = 25, max_length: int = 50) -> Dataset:
    """The adding problem with lengths uniform in [min_length, max_length].

    Step t of row b is ``[value, marker]``; the two markers sit in the first
    and the second half of the row's real part, so they are on average a
    third of the sequence apart. Padded steps are all zero.
    """
    if min_length < 2:
        raise ValueError(f"min_length must be >= 2 (two marked steps), got {min_length}")
    lengths = _draw_lengths(count, min_length, max_length, rng)
    mask = le.lengths_to_mask(lengths, maxlen=max_length)
    values = rng.uniform(0.0, 1.0, size=(count, max_length)).astype(np.float32) * mask
    half = lengths // 2
    first = (rng.random(count) * half).astype(np.int64)
    second = half + (rng.random(count) * (lengths - half)).astype(np.int64)
    markers = np.zeros((count, max_length), np.float32)
    rows = np.arange(count)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    targets = (values[rows, first] + values[rows, second])[:, None].astype(np.float32)
    return Dataset(np.stack([values, markers], axis=-1), mask, targets)


# Token ids of the sentiment task; ids >= FIRST_FILLER are filler words.
PAD, GOOD, BAD, INDEED, NOT = 0, 1, 2, 3, 4
FIRST_FILLER = 5
OPENING_WINDOW = 3   # the opinion word is among the first OPENING_WINDOW tokens
CLOSING_WINDOW = 3   # the verdict word is among the last CLOSING_WINDOW tokens


def make_sentiment(count: int, rng: np.random.Generator, min_length: int = 15, max_length: int = 40,
                   vocabulary: int = 24) -> Dataset:
    """Reviews of filler words with an opinion word near the start and often a verdict near the end.

    label = 1 (positive) when the opinion is "good" and there is no "not",
    or the opinion is "bad" and the verdict is "not"; else 0. The verdict is
    "indeed", "not" or absent, each in a third of the reviews. (Reviews with
    no verdict give the opinion a signal of its own, which is what lets
    gradient descent start carrying it; with a verdict in every review the
    task is an XOR of the two ends, which stalls at 50%.)
    """
    if min_length < OPENING_WINDOW + CLOSING_WINDOW:
        raise ValueError(f"min_length must be >= {OPENING_WINDOW + CLOSING_WINDOW}, got {min_length}")
    lengths = _draw_lengths(count, min_length, max_length, rng)
    mask = le.lengths_to_mask(lengths, maxlen=max_length)
    tokens = rng.integers(FIRST_FILLER, vocabulary, size=(count, max_length))
    rows = np.arange(count)
    opinion_is_good = rng.random(count) < 0.5
    verdict = rng.integers(0, 3, size=count)          # 0: no verdict, 1: "indeed", 2: "not"
    verdict_is_not = verdict == 2
    opinion_step = rng.integers(0, OPENING_WINDOW, size=count)
    verdict_step = lengths - 1 - rng.integers(0, CLOSING_WINDOW, size=count)
    tokens[rows, opinion_step] = np.where(opinion_is_good, GOOD, BAD)
    has_verdict = verdict > 0
    tokens[rows[has_verdict], verdict_step[has_verdict]] = np.where(verdict_is_not, NOT, INDEED)[has_verdict]
    tokens[~mask] = PAD
    labels = (opinion_is_good != verdict_is_not).astype(np.float32)[:, None]
    return Dataset(tokens.astype(np.int64), mask, labels)


# -- the model -------------------------------------------------------------------------------------------------
class DemoModel:
    """[Embedding] -> Bidirectional(LSTM) -> LSTM -> Dense(1): one ``le.Sequential``, trained end to end.

    The embedding table and the head start from the draws the demo's settings
    were tuned with (U(-0.5, 0.5) for the table, Glorot uniform for the head,
    from ``np.random.default_rng(seed)``), loaded with ``set_weights``.
    """

    def __init__(self, input_features: int, first_units: int, second_units: int, backend: str, seed: int,
                 vocabulary: int | None = None):
        self.backend = registry.get_backend_object(
            resolve_backend_name(backend, np.zeros((1, 1, input_features), np.float32)))
        embedding = le.Embedding(vocabulary, input_features, seed=seed) if vocabulary else None
        head = le.Dense(1, seed=seed)
        self.model = le.Sequential(([embedding] if embedding else []) + [
            le.Bidirectional(le.LSTM(first_units, return_sequences=True, backend=backend, seed=seed + 1)),
            le.LSTM(second_units, backend=backend, seed=seed + 3),
            head,
        ]).build(input_features)
        rng = np.random.default_rng(seed)
        if embedding is not None:
            embedding.set_weights([rng.uniform(-0.5, 0.5, (vocabulary, input_features)).astype(np.float32)])
        limit = math.sqrt(6.0 / (second_units + 1))  # Glorot uniform, as Keras's Dense
        head.set_weights([rng.uniform(-limit, limit, (second_units, 1)).astype(np.float32),
                          np.zeros(1, np.float32)])

    # params and grads make the model an optimizer target (lstmeng.optim reads both at every step).
    @property
    def params(self):
        return self.model.params

    @property
    def grads(self):
        return self.model.grads

    def __call__(self, inputs: np.ndarray, mask: np.ndarray, training: bool = False) -> np.ndarray:
        """Returns the head's output ``[N, 1]`` (a value, or a logit for sentiment)."""
        return self.model(inputs, mask=mask, training=training)

    def backward(self, doutput: np.ndarray) -> None:
        self.model.backward(doutput)


# -- tasks -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Everything that differs between the two tasks, with the defaults that meet their targets."""

    name: str
    metric: str                    # what validation reports
    target: float                  # the metric the demo must reach
    higher_is_better: bool
    epochs: int
    batch_size: int
    learning_rate: float
    first_units: int
    second_units: int
    input_features: int
    train_size: int
    validation_size: int
    make: Callable[..., Dataset]
    vocabulary: int | None = None

    def reached(self, value: float) -> bool:
        return value > self.target if self.higher_is_better else value < self.target


TASK_SPECS = {
    "adding": TaskSpec(name="adding", metric="MSE", target=0.01, higher_is_better=False,
                       epochs=8, batch_size=32, learning_rate=1e-2, first_units=16, second_units=16,
                       input_features=2, train_size=3200, validation_size=512, make=make_adding),
    "sentiment": TaskSpec(name="sentiment", metric="accuracy", target=0.9, higher_is_better=True,
                          epochs=6, batch_size=32, learning_rate=5e-3, first_units=16, second_units=16,
                          input_features=8, train_size=3200, validation_size=512, make=make_sentiment,
                          vocabulary=24),
}


def loss_and_gradient(task: TaskSpec, outputs: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean loss over the batch and its gradient w.r.t. ``outputs`` ``[N, 1]``.

    adding: mean squared error. sentiment: binary cross-entropy on the logit.
    """
    if task.name == "adding":
        return le.losses.mean_squared_error(outputs, targets)
    return le.losses.binary_cross_entropy(outputs, targets)


def baseline(task: TaskSpec, train: Dataset, validation: Dataset) -> float:
    """The metric of a model that ignores its input: the training mean (adding) or majority class."""
    if task.name == "adding":
        return float(np.mean((validation.targets - train.targets.mean()) ** 2))
    majority = float(train.targets.mean() >= 0.5)
    return float(np.mean(validation.targets == majority))


def evaluate(task: TaskSpec, model: DemoModel, data: Dataset, batch_size: int = 256) -> float:
    """Validation metric: MSE (adding) or accuracy (sentiment)."""
    outputs = np.concatenate([
        model(part.inputs, part.mask)
        for part in (data.batch(np.arange(start, min(start + batch_size, len(data))))
                     for start in range(0, len(data), batch_size))])
    if task.name == "adding":
        return float(np.mean((outputs - data.targets) ** 2))
    return float(np.mean((outputs > 0) == (data.targets > 0.5)))


# -- training --------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DemoResult:
    """What ``run_demo`` measured."""

    task: str
    backend: str                     # the backend that actually ran (after "auto")
    metric: str
    target: float
    baseline: float
    validation: list[float]          # metric after each epoch
    train_loss: list[float]          # mean training loss of each epoch
    batch_loss: list[float]          # every batch's loss, in order
    seconds: float                   # training time (evaluation excluded)
    sequences: int                   # training sequences processed
    reached: bool

    @property
    def sequences_per_second(self) -> float:
        return self.sequences / self.seconds if self.seconds > 0 else float("nan")

    @property
    def final(self) -> float:
        return self.validation[-1]


def resolve_backend_name(requested: str, sample: np.ndarray) -> str:
    """The backend that ``requested`` ("auto" or a name) runs on host float32 input."""
    return registry.resolve(requested, sample, np.dtype("float32"), "tanh", "sigmoid").name


def run_demo(task_name: str = "adding", backend: str = "auto", epochs: int | None = None, seed: int = 0,
             progress: bool = True, train_size: int | None = None,
             blas_threads: int | None = DEFAULT_BLAS_THREADS) -> DemoResult:
    """Train the demo model on one task and report the validation metric after each epoch.

    Args:
        task_name: "adding" or "sentiment".
        backend: a backend name or "auto".
        epochs: defaults to the task's own setting (which meets its target).
        seed: seeds the data, the weights and the batch order.
        progress: show a tqdm progress bar per epoch (on stderr).
        train_size: override the number of training sequences (tests use few).
        blas_threads: BLAS threads while training; None leaves BLAS as it is.

    Raises:
        DivergenceError: a batch's loss is NaN or infinite.
    """
    with threads.blas_limits(blas_threads):
        return _train(TASK_SPECS[task_name], backend, epochs, seed, progress, train_size)


def _train(task: TaskSpec, backend: str, epochs: int | None, seed: int, progress: bool,
           train_size: int | None) -> DemoResult:
    epochs = task.epochs if epochs is None else epochs
    rng = np.random.default_rng(seed)
    train = task.make(task.train_size if train_size is None else train_size, rng)
    validation = task.make(task.validation_size, rng)
    model = DemoModel(task.input_features, task.first_units, task.second_units, backend, seed,
                      vocabulary=task.vocabulary)
    backend_name = model.backend.name
    # eps 1e-7 is Keras's default, which the demo's settings were tuned with.
    optimizer = optim.Adam(model, lr=task.learning_rate, eps=1e-7)

    batch_loss, train_loss, scores = [], [], []
    seconds = 0.0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(train))
        batches = [order[start:start + task.batch_size] for start in range(0, len(order), task.batch_size)]
        bar = _progress_bar(len(batches), f"epoch {epoch}/{epochs}", progress)
        epoch_losses, epoch_start = [], time.perf_counter()
        for done, rows in enumerate(batches, start=1):
            part = train.batch(rows)
            outputs = model(part.inputs, part.mask, training=True)
            loss, doutputs = loss_and_gradient(task, outputs, part.targets)
            if not math.isfinite(loss):
                bar.close()
                raise DivergenceError(
                    f"training diverged: the loss is {loss} at epoch {epoch}, batch {done} "
                    f"(backend {backend_name}); try a lower learning rate or another --seed")
            model.backward(doutputs)
            # Clipping keeps one unlucky batch (a large gradient through a long
            # sequence) from throwing the weights far away.
            optim.clip_grad_norm(model, max_norm=GRADIENT_CLIP_NORM)
            optimizer.step()
            epoch_losses.append(loss)
            elapsed = time.perf_counter() - epoch_start
            bar.set_postfix(loss=f"{np.mean(epoch_losses[-20:]):.4f}",
                            seq_per_s=f"{done * task.batch_size / max(elapsed, 1e-9):.0f}", refresh=False)
            bar.update(1)
        seconds_this_epoch = time.perf_counter() - epoch_start
        seconds += seconds_this_epoch
        batch_loss += epoch_losses
        train_loss.append(float(np.mean(epoch_losses)))
        scores.append(evaluate(task, model, validation))
        bar.set_postfix(loss=f"{train_loss[-1]:.4f}", seq_per_s=f"{len(train) / (seconds_this_epoch):.0f}",
                        **{f"val_{task.metric}": f"{scores[-1]:.4f}"})
        bar.close()

    return DemoResult(task=task.name, backend=backend_name, metric=task.metric, target=task.target,
                      baseline=baseline(task, train, validation), validation=scores, train_loss=train_loss,
                      batch_loss=batch_loss, seconds=seconds, sequences=epochs * len(train),
                      reached=bool(scores) and task.reached(scores[-1]))




def summary(result: DemoResult) -> str:
    """The lines printed after training."""
    comparison = "<" if not TASK_SPECS[result.task].higher_is_better else ">"
    verdict = "reached" if result.reached else "NOT reached"
    return "\n".join([
        f"task: {result.task}    backend: {result.backend}",
        f"training time: {result.seconds:.1f} s for {len(result.validation)} epochs, "
        f"{result.sequences_per_second:.0f} sequences/s",
        f"validation {result.metric}: {result.final:.4f}  (input-blind baseline {result.baseline:.4f}; "
        f"target {comparison} {result.target:g}: {verdict})",
    ])


def plot_losses(result: DemoResult, path: str) -> None:
    """Loss curve PNG: every batch's training loss, and the validation metric per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(9, 3.5))
    batches_per_epoch = len(result.batch_loss) / max(len(result.validation), 1)
    loss_axes.plot(np.arange(1, len(result.batch_loss) + 1) / batches_per_epoch, result.batch_loss,
                   linewidth=0.6, label="training batches")
    loss_axes.plot(np.arange(1, len(result.train_loss) + 1), result.train_loss, "o-", label="epoch mean")
    loss_axes.set_yscale("log")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("MSE" if result.task == "adding" else "cross-entropy")
    loss_axes.set_title(f"{result.task}: training loss")
    loss_axes.legend()
    epochs = np.arange(1, len(result.validation) + 1)
    metric_axes.plot(epochs, result.validation, "o-", label=f"validation {result.metric}")
    metric_axes.axhline(result.baseline, color="grey", linestyle=":", label="input-blind baseline")
    metric_axes.axhline(result.target, color="green", linestyle="--", label="target")
    if result.task == "adding":
        metric_axes.set_yscale("log")
    metric_axes.set_xlabel("epoch")
    metric_axes.set_title(f"validation {result.metric} ({result.backend})")
    metric_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
