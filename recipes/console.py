"""What a recipe prints while it runs: one labelled progress bar per training run, the Trainer's logs as one compact
line per logging step, each library warning once, and no progress bars from converting a model while it loads.

    trainer = Trainer(...)
    use_console(trainer, "training NOLA (k=l=400, r=8)")   # replaces Trainer's bar and its printed dicts
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from typing import Iterator

from transformers import TrainerCallback

# Logged keys shown on a step's line, in this order, under these names; others (epoch, grad_norm, ...) follow.
_SHOWN_FIRST = {"loss": "loss", "eval_loss": "eval loss", "learning_rate": "lr"}
# Keys that say nothing per step (throughput counters) or are shown on the closing line instead.
_LEFT_OUT = {"total_flos", "epoch", "train_samples_per_second", "train_steps_per_second", "eval_samples_per_second",
             "eval_steps_per_second", "eval_runtime"}
_SEPARATOR = " · "


def _number(name: str, value) -> str:
    """A logged value as the line prints it: the learning rate in scientific notation, other floats with 4
    significant digits, everything else as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if name == "learning_rate":
        return f"{value:.1e}"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def log_line(logs: dict, step: int, max_steps: int) -> str:
    """One line for one of Trainer's log dicts, e.g. ``step 10/24 · loss 2.31 · lr 4.2e-03 · grad_norm 0.231``.

    The closing dict of ``Trainer.train`` (it holds ``train_runtime``) becomes
    ``trained 24 steps in 83 s · mean loss 2.1``.
    """
    if "train_runtime" in logs:
        parts = [f"trained {step} steps in {logs['train_runtime']:.0f} s"]
        if logs.get("train_loss") is not None:
            parts.append(f"mean loss {_number('train_loss', logs['train_loss'])}")
        return _SEPARATOR.join(parts)
    parts = [f"step {step}/{max_steps}" if max_steps and max_steps > 0 else f"step {step}"]
    for key, name in _SHOWN_FIRST.items():
        if key in logs:
            parts.append(f"{name} {_number(key, logs[key])}")
    for key, value in logs.items():
        if key not in _SHOWN_FIRST and key not in _LEFT_OUT:
            parts.append(f"{key} {_number(key, value)}")
    return _SEPARATOR.join(parts)


class ConsoleCallback(TrainerCallback):
    """Trainer's console output for one run: a progress bar named ``label`` (e.g. ``training LoRA (r=1)``) and one
    :func:`log_line` per logging step, written above the bar (without a bar when ``disable_tqdm`` is set).

    Install it with :func:`use_console`, which also removes Trainer's own bar and its printing of raw log dicts.
    """

    def __init__(self, label: str = "training"):
        self.label = label
        self.bar = None
        self.eval_bar = None
        self.lines: list[str] = []  # every line written, so a caller (or a test) can read the run's log back

    def _write(self, line: str) -> None:
        self.lines.append(line)
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero and not args.disable_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=state.max_steps, desc=self.label, unit="step", dynamic_ncols=True)
            self.bar.update(state.global_step)  # a resumed run starts part-way

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_prediction_step(self, args, state, control, eval_dataloader=None, **kwargs):
        if not state.is_world_process_zero or args.disable_tqdm:
            return
        if self.eval_bar is None:
            from tqdm.auto import tqdm

            try:
                total = len(eval_dataloader)
            except TypeError:
                total = None
            self.eval_bar = tqdm(total=total, desc="evaluating " + self.label.removeprefix("training "),
                                 unit="batch", dynamic_ncols=True, leave=False)
        self.eval_bar.update(1)

    def _close_eval_bar(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()
            self.eval_bar = None

    def on_evaluate(self, args, state, control, **kwargs):
        self._close_eval_bar()

    def on_predict(self, args, state, control, **kwargs):
        self._close_eval_bar()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            self._write(log_line(logs, state.global_step, state.max_steps))

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def use_console(trainer, label: str) -> ConsoleCallback:
    """Make ``trainer`` print through a :class:`ConsoleCallback` named ``label`` instead of its own progress bar and
    raw log dicts; returns the callback."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    for own in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(own)
    with contextlib.suppress(ImportError):  # the notebook bar, where Trainer chose it
        from transformers.utils.notebook import NotebookProgressCallback

        trainer.remove_callback(NotebookProgressCallback)
    callback = ConsoleCallback(label)
    trainer.add_callback(callback)
    return callback


class OnceFilter(logging.Filter):
    """Lets each distinct (logger, level, message) through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[tuple[str, int, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


_ONCE = OnceFilter()


class _ShowOnce:
    """A ``warnings.showwarning`` that passes each (text, category) to ``show`` once, as one line (without the
    source line Python prints under it, which is the library's ``warnings.warn(...)`` call)."""

    def __init__(self, show):
        self.show = show
        self.seen: set[tuple[str, type]] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None):
        key = (str(message), category)
        if key not in self.seen:
            self.seen.add(key)
            self.show(message, category, filename, lineno, file, "" if line is None else line)


def each_warning_once() -> None:
    """Show each library warning once per process: Python warnings with the same text and category, and log records
    with the same message through transformers' handler and the root logger's (peft's and accelerate's loggers reach
    the root).

    Python's filters cannot do this: every ``warnings.catch_warnings`` block (Trainer and accelerate enter them every
    step) resets what "default" and even "once" remember, so the same warning repeats. The filters still decide
    what is shown at all (ignored deprecations, ``-W`` options); this only drops repeats at the point of printing.
    """
    if not isinstance(warnings.showwarning, _ShowOnce):
        warnings.showwarning = _ShowOnce(warnings.showwarning)
    import transformers.utils.logging as hf_logging

    handlers = list(hf_logging.get_logger().handlers)
    root = logging.getLogger()
    if not root.handlers:
        # Without a handler, records fall to logging's last resort, which no filter can reach; this is the same
        # output (stderr, WARNING and above) with the filter on it.
        handler = logging.StreamHandler()
        handler.setLevel(logging.WARNING)
        root.addHandler(handler)
    handlers.extend(root.handlers)
    for handler in handlers:
        if _ONCE not in handler.filters:
            handler.addFilter(_ONCE)


@contextlib.contextmanager
def no_loading_bars() -> Iterator[None]:
    """Within the block, no progress bars from loading a model: transformers' "Loading weights" and the GGUF
    reader's "Converting and de-quantizing GGUF tensors" (which uses tqdm directly, so no transformers switch turns
    it off; its module's ``tqdm`` is replaced by a disabled one for the block). Download bars stay."""
    import transformers.utils.logging as hf_logging
    from tqdm.auto import tqdm

    def silent_tqdm(*args, **kwargs):
        return tqdm(*args, **{**kwargs, "disable": True})

    with contextlib.ExitStack() as stack:
        set_hook = getattr(hf_logging, "set_tqdm_hook", None)
        if set_hook is not None:  # transformers releases without the hook keep their "Loading weights" bar
            previous = set_hook(None)

            def hook(factory, args, kwargs):
                if str(kwargs.get("desc", "")).startswith("Loading weights"):
                    kwargs = {**kwargs, "disable": True}
                return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

            set_hook(hook)
            stack.callback(set_hook, previous)
        with contextlib.suppress(ImportError):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils

            if hasattr(gguf_utils, "tqdm"):
                stack.enter_context(_replaced(gguf_utils, "tqdm", silent_tqdm))
        yield


@contextlib.contextmanager
def _replaced(module, name: str, value) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)
