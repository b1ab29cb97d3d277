"""What a drop asks for, as one object: built once (by the CLI from its options, or by a caller), checked once.

``DropRequest.check()`` refuses everything that needs no model; ``check_source(config)`` what the source's
config.json (or a loaded model's config) adds: the layer count, the parts an export no longer has, the formats it
rules out. ``api.drop`` runs both before any model work, and the second again once a GGUF or Hub source is loaded.
"""

from dataclasses import dataclass
from pathlib import Path

from llmdrop.errors import LlmdropError
from llmdrop.planning.plan import layers, parse_layers, select

# the explicit lists, in the request's order: (field, part, name in messages, option)
LISTS = (
    ("attn_layers", "attn", "attention", "--attn-layers"),
    ("mlp_layers", "mlp", "the MLP", "--mlp-layers"),
    ("block_layers", "block", "block", "--block-layers"),
)


@dataclass(frozen=True)
class DropRequest:
    """Counts (``--attn/--mlp/--blocks/--joint N``), explicit lists (``"3,5,20-29"`` or lists of ints), the
    skip-attention shortcut, how counted parts are chosen (``selector`` and its parameters, ``scores`` to reuse),
    compensation, and the export's format, dtype and shard size."""

    attn: int = 0
    mlp: int = 0
    blocks: int = 0
    joint: int = 0
    attn_layers: str | list[int] | None = None
    mlp_layers: str | list[int] | None = None
    block_layers: str | list[int] | None = None
    skip_attention_from: int | None = None
    selector: str = "cosine"
    metric: str = "cosine"
    candidates: int | None = None
    loss_samples: int = 8
    scores: object = None  # a scores file (path) or a Scores object
    force_scores: bool = False
    compensate: str | None = None
    compensate_ridge: float = 1.0
    fmt: str = "auto"
    dtype: str = "auto"
    max_shard_size: str | int | None = None
    batch_size: int = 1

    @classmethod
    def build(cls, *, iterative: bool = False, **options) -> "DropRequest":
        """The request of ``drop``'s keyword options; ``iterative`` is ``selector="iterative"`` (the --iterative
        flag)."""
        if iterative:
            chosen = options.get("selector", "cosine")
            if chosen not in ("cosine", "iterative"):
                raise LlmdropError(f"--iterative re-scores by cosine; --select {chosen} does not combine with it")
            options["selector"] = "iterative"
        return cls(**options)

    @property
    def counts(self) -> dict:
        return {"attn": self.attn, "mlp": self.mlp, "blocks": self.blocks, "joint": self.joint}

    @property
    def counted(self) -> bool:
        return any(self.counts.values())

    @property
    def lists(self) -> tuple:
        return self.attn_layers, self.mlp_layers, self.block_layers

    @property
    def explicit(self) -> bool:
        return any(self.lists) or self.skip_attention_from is not None

    @property
    def scores_file(self) -> Path | None:
        return self.scores if isinstance(self.scores, (str, Path)) else None

    def check(self) -> None:
        """Everything that needs no model, in the order a user meets it (the selector's own checks are
        ``selectors.Selector.check``)."""
        from llmdrop.formats.exporters import check_format_name
        from llmdrop.passes.scoring import check_metric
        from llmdrop.planning.compensate import check_method
        from llmdrop.source.calibration import check_sizes

        check_sizes(batch_size=self.batch_size)
        check_format_name(self.fmt)
        check_metric(self.metric)
        self._check_ranking(self.metric, f"--metric {self.metric}")
        for text in self.lists:
            if isinstance(text, str):
                parse_layers(text)  # syntax errors first; ranges need the layer count
        if self.skip_attention_from is not None and self.counted:
            raise LlmdropError(
                "--skip-attention-from combines only with explicit layer lists, not with "
                "--attn/--mlp/--blocks/--joint counts or --iterative"
            )
        check_method(
            self.compensate,
            ridge=self.compensate_ridge,
            may_drop_blocks=bool(
                self.blocks
                or self.block_layers
                or self.joint
                or ((self.attn or self.attn_layers) and (self.mlp or self.mlp_layers))
            ),
        )
        if self.max_shard_size is not None:
            from llmdrop.formats.stream_export import parse_shard_size

            parse_shard_size(self.max_shard_size)

    def _check_ranking(self, metric: str, label: str) -> None:
        """A data-free metric (gate-norm) ranks attention sublayers only, once: refuse counts of other parts and the
        selectors that re-score or search. ``label`` names what gave the metric (the option, or a scores file)."""
        from llmdrop.passes.scoring import needs_tokens, scored_kinds

        if needs_tokens(metric) or not self.counted:
            return
        why = f"{label} ranks attention sublayers only, once, from the weights"
        if self.selector != "cosine":
            how = "--iterative" if self.selector == "iterative" else f"--select {self.selector}"
            raise LlmdropError(f"{why}: count them with --attn N and --select cosine (the default), not {how}")
        kinds = scored_kinds(metric)
        for option, count, kind in (
            ("--blocks", self.blocks, "block"),
            ("--mlp", self.mlp, "mlp"),
            ("--joint", self.joint, "mlp"),
        ):
            if count and kind not in kinds:
                raise LlmdropError(
                    f"{why}: {option} N needs cosine or angular scores (count attention with --attn N, or score "
                    "with --metric cosine)"
                )

    def check_source(self, config, scores=None) -> None:
        """What the source's config (a loaded config, or config.json as a dict; {} when not known yet) refuses: the
        layer count, parts an export no longer has, an explicit --format it rules out, and a metric that cannot
        score it."""
        from llmdrop.formats.exporters import check_format_for_source
        from llmdrop.source.arch import absent_parts

        if scores is not None:
            self._check_ranking(scores.metric, f"a {scores.metric} scores file")
        elif self.counted and self.metric == "gate-norm":
            from llmdrop.passes.gatenorm import check

            check(config)
        get = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
        n = get("num_hidden_layers") if config else None
        if isinstance(n, int):
            self._check_layers(n, absent_parts(config), scores)
        check_format_for_source(self.fmt, config if isinstance(config, dict) else config.to_dict())

    def _check_layers(self, n: int, absent: dict, scores) -> None:
        if scores is not None and scores.num_layers != n:
            raise LlmdropError(f"the scores are for {scores.num_layers} layers but the model has {n}")
        for value, (_, kind, what, option) in zip(self.lists, LISTS):
            gone = sorted(set(layers(value, n)) & set(absent.get(kind, ())))
            if gone:
                raise LlmdropError(
                    f"{what} of layer {gone[0]} is not in the model any more (it is an export that dropped "
                    f"{what} {', '.join(map(str, absent[kind]))}): leave it out of {option}"
                )
        if self.skip_attention_from is not None:
            from llmdrop.planning.plan import skip_attention_layers

            skip_attention_layers(n, self.skip_attention_from)
        if self.counted:
            from llmdrop.source.arch import mask_absent

            # Selecting on equal importances makes every check (and message) of the real selection; explicit lists
            # only narrow the choice further, which the real selection checks.
            select(mask_absent({kind: [0.0] * n for kind in ("attn", "mlp", "block")}, absent), **self.counts)

    def explicit_lists(self, n: int, absent: dict) -> dict:
        """{"attn_layers", "mlp_layers", "block_layers"} as layer lists of a model with ``n`` layers; the
        skip-attention layers join the attention list (those an export lacks already are left out)."""
        out = {name: layers(value, n) for value, (name, *_) in zip(self.lists, LISTS)}
        if self.skip_attention_from is not None:
            # the same attention drops as `probe --manipulation skip-attention` at that layer
            from llmdrop.planning.plan import skip_attention_layers

            skipped = set(skip_attention_layers(n, self.skip_attention_from)) - set(absent["attn"])
            out["attn_layers"] = sorted(set(out["attn_layers"]) | skipped)
        return out


def choose(name: str, loaded, tokens, *, importance: dict | None = None, progress: bool = True, **request):
    """The plan of selector ``name`` for ``request`` (``DropRequest`` fields: counts, candidates, ...) on a loaded
    model, and its record: the selection step of ``api.drop`` alone."""
    from llmdrop.planning.selectors import selector
    from llmdrop.source.arch import absent_parts, mask_absent

    absent = absent_parts(loaded.model.config)
    importance = mask_absent(importance, absent) if importance else None
    plan, record, _ = selector(name).choose(
        loaded, tokens, importance, DropRequest(selector=name, **request), absent=absent, progress=progress
    )
    return plan, record
