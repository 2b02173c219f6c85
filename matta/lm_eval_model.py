"""matta in lm-evaluation-harness: the harness's model `"matta"`, and an adapter.

Importing this module registers `MattaLM` in the harness's model registry, so that

    lm_eval.simple_evaluate(model="matta", model_args="run=RUN_DIR,stream=student", tasks=[...])

evaluates a model that `matta train` or `matta extract` wrote, and
`model=make_lm_eval_adapter(scorer)` one in memory. The harness's `lm_eval` command (0.4.13)
imports no package but its own, so `matta lm-eval ARGS` runs that command with this module
imported first. matta's package metadata also declares the model under
the `lm_eval.models` entry-point group, for harness versions that look plugins up there.

Model arguments: `run` (a run directory, or a folder written by `matta extract`), `stream`
(student, ta, wide_narrow_wide:K, or one wide/narrow/skip per TA layer joined by `/`; runs
only), `max_length` (a shorter context window). The harness's `batch_size` (an integer,
`auto` or `auto:N`), `max_batch_size` and `device` (a CUDA device falls back to the CPU
where there is none, as the harness's own models do) are honoured; chat templates are refused.
"""
import logging

import torch

try:
    import lm_eval.models  # noqa: F401  the harness loads its own models only into an empty registry
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:
    raise ImportError(f'matta.lm_eval_model needs lm-evaluation-harness ({exc}): pip install -e ".[eval]"',
                      name="lm_eval") from None

from .evaluation import LMScorer, TaskError, load_scorer

log = logging.getLogger(__name__)
NO_CHAT = "matta models have no chat template; drop --apply_chat_template (and --fewshot_as_multiturn)"


def _batch_size(value):
    """The harness's batch size (1, "8", "auto", "auto:4") as an int or "auto"."""
    text = str(value)
    if text == "auto" or text.startswith("auto:"):
        return "auto"
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise TaskError(f"batch_size must be a positive integer, 'auto' or 'auto:N', got {value!r}")


@register_model("matta")
class MattaLM(LM):
    """lm-evaluation-harness's interface to a matta model (an `LMScorer` underneath)."""

    def __init__(self, run=None, stream=None, max_length=None, batch_size=1, max_batch_size=64, device=None,
                 *, scorer=None, **unknown):
        super().__init__()
        if unknown:
            raise TaskError(
                f"unknown model_args {', '.join(sorted(unknown))}; matta takes run=, stream=, max_length= "
                "(and the harness's batch_size, max_batch_size, device)"
            )
        if scorer is None:
            if run is None:
                raise TaskError("model_args needs run=RUN_DIR (a `matta train` run) or a folder written by `matta extract`")
            if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
                # The harness's command line asks for cuda:0 unless told otherwise; like its own
                # models, fall back to the CPU on a machine without CUDA.
                log.warning("device %s requested but CUDA is not available; evaluating on the CPU", device)
                device = "cpu"
            scorer = load_scorer(str(run), None if stream is None else str(stream), device=device,
                                 batch_size=_batch_size(batch_size), max_batch_size=int(max_batch_size),
                                 max_length=max_length)
        elif not isinstance(scorer, LMScorer):
            raise TypeError(f"scorer must be an LMScorer, got {type(scorer).__name__}")
        self.scorer = scorer

    @property
    def device(self):
        return self.scorer.device

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.scorer.loglikelihood([tuple(r.args[:2]) for r in requests], progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.scorer.loglikelihood_rolling([r.args[0] for r in requests], progress=not disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self.scorer.generate_until([(r.args[0], r.args[1]) for r in requests], progress=not disable_tqdm)

    def chat_template(self, chat_template=False):
        if chat_template:
            raise TaskError(NO_CHAT)
        return None

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        raise TaskError(NO_CHAT)

    @property
    def tokenizer_name(self):
        raise TaskError(NO_CHAT)


def make_lm_eval_adapter(scorer: LMScorer) -> MattaLM:
    """The harness's `LM` for a scorer: `lm_eval.simple_evaluate(model=make_lm_eval_adapter(scorer), ...)`."""
    if not isinstance(scorer, LMScorer):
        raise TypeError(
            f"make_lm_eval_adapter needs an LMScorer, got {type(scorer).__name__}; wrap a model first: "
            "make_lm_eval_adapter(LMScorer(model, tokenizer, block_size=...)), or load_scorer(RUN_DIR, 'student')"
        )
    return MattaLM(scorer=scorer)
