"""The selectors: how counted parts (``--attn/--mlp/--blocks/--joint N``) are chosen, one registered object each.

A selector declares what it needs (calibration tokens, cosine scores, the model in memory), refuses what it cannot
do before any model work (``check``), and chooses (``choose``: the plan, its record for llmdrop.json, and the
importance to record when it computed its own). The algorithms live in ``planning.select``; this module imports no
torch, so that the CLI's ``--select`` choices and help come from here at no cost. A new selector is one class here,
its entry in ``SELECTORS`` and its tests.
"""

from llmdrop.errors import LlmdropError


class Selector:
    """How counted parts are chosen. A selector declares what it needs (calibration tokens, cosine scores, the model
    in memory), refuses what it cannot do before any model work (``check``), and chooses (``choose``: the plan and
    its record for llmdrop.json). A new selector is one subclass here and its entry in ``SELECTORS``."""

    name = ""
    help = ""
    needs_tokens = True  # calibration tokens to choose with (besides those that score, see needs_cosine)
    needs_cosine = False  # cosine importance: computed (in memory or streamed) unless --scores gives it
    takes_scores = False  # --scores may give that importance
    in_memory: str | None = None  # why it cannot run on a streamed model (None: it can)
    record_key = "selection"  # where llmdrop.json keeps its record
    only_counts = True  # chooses counted parts only (cosine also takes explicit lists beside counts)

    def check(self, request) -> None:
        if request.candidates is not None and request.candidates < 1:
            raise LlmdropError(f"--candidates must be >= 1 (got {request.candidates})")
        if request.loss_samples < 1:
            raise LlmdropError(f"--loss-samples must be >= 1 (got {request.loss_samples})")
        if self.only_counts and (request.explicit or not request.counted):
            raise LlmdropError(
                f"--select {self.name} needs counts (--attn/--mlp/--blocks/--joint N) and no explicit lists"
            )
        if request.scores is not None and not self.takes_scores:
            raise LlmdropError(f"--select {self.name} reads no scores; leave out --scores")

    def choose(self, loaded, tokens, importance, request, *, absent: dict, progress: bool) -> tuple:
        """(the plan, its record, the importance to record as the scores if the selector computed its own)."""
        raise NotImplementedError


class Cosine(Selector):
    name = "cosine"
    help = "the lowest importance, in one shot (LLM-Drop)"
    needs_tokens = only_counts = False
    needs_cosine = takes_scores = True

    def choose(self, loaded, tokens, importance, request, *, absent, progress):
        from .plan import select

        plan = select(importance, **request.counts, **request.explicit_lists(loaded.num_layers, absent))
        return plan, {"selector": "cosine", "metric": request.metric}, None


class Iterative(Selector):
    name = "iterative"
    help = "the lowest importance, one part at a time, re-scored after each drop (= --iterative)"
    in_memory = "--iterative re-scores the model in memory after every drop; it cannot --stream"
    record_key = "iterative_steps"

    def check(self, request):
        if request.explicit or not request.counted:
            raise LlmdropError("--iterative needs counts (--attn/--mlp/--blocks/--joint N) and no explicit lists")
        super().check(request)

    def choose(self, loaded, tokens, importance, request, *, absent, progress):
        from .select import iterative

        return iterative(loaded, tokens, request, progress=progress)


class Loss(Selector):
    name = "loss"
    help = "greedy on the calibration loss (BlockPruner, SLEB, FinerCut)"
    needs_cosine = takes_scores = True
    in_memory = "--select loss evaluates the whole model once per candidate; it cannot --stream"

    def choose(self, loaded, tokens, importance, request, *, absent, progress):
        from .select import loss_search

        return *loss_search(
            loaded.model,
            loaded.adapter,
            tokens,
            importance,
            **request.counts,
            candidates=request.candidates,
            loss_samples=request.loss_samples,
            batch_size=request.batch_size,
            progress=progress,
            absent=absent,
        ), None


class AngularContiguous(Selector):
    name = "angular-contiguous"
    help = "a run of --blocks N whose input and output are closest (Gromov et al.)"

    def check(self, request):
        super().check(request)
        if request.attn or request.mlp or request.joint:
            raise LlmdropError("--select angular-contiguous cuts a run of whole blocks: use --blocks N only")

    def choose(self, loaded, tokens, importance, request, *, absent, progress):
        from .select import angular_contiguous

        plan, record = angular_contiguous(
            loaded, tokens, request.blocks, batch_size=request.batch_size, progress=progress
        )
        return plan, record, None


class Reverse(Selector):
    name = "reverse"
    help = "the last parts before the final layer (Lu et al.)"
    needs_tokens = False

    def choose(self, loaded, tokens, importance, request, *, absent, progress):
        from .select import reverse

        return *reverse(loaded.num_layers, **request.counts, absent=absent), None


SELECTORS = {s.name: s for s in (Cosine(), Loss(), AngularContiguous(), Reverse(), Iterative())}


def selector(name: str) -> Selector:
    if name not in SELECTORS:
        raise LlmdropError(f"unknown --select {name!r}; use {', '.join(SELECTORS)}")
    return SELECTORS[name]
