"""Human-facing output: the importance table in the terminal and the importance plot."""

from rich.console import Console
from rich.table import Table

from llmdrop.files import atomic_file

# on stderr: stdout stays clean for --json
console = Console(stderr=True)


def scores_table(scores, plan=None) -> Table:
    """One row per layer; the lowest (most redundant) values of each kind are highlighted; parts an export no
    longer has are shown as absent. Kinds the metric does not score (gate-norm: MLP and blocks) have no column."""
    imp = scores.importance
    n = scores.num_layers
    kinds = [k for k in ("attn", "mlp", "block") if k in imp]
    lowest = {
        k: set(sorted((i for i in range(n) if imp[k][i] is not None), key=lambda i: imp[k][i])[: max(1, n // 4)])
        for k in imp
    }
    table = Table(title=f"importance ({scores.metric}) of {scores.model} - lower = more redundant")
    table.add_column("layer", justify="right")
    for kind in kinds:
        table.add_column(kind, justify="right")
    if plan is not None:
        table.add_column("dropped")
    for i in range(n):
        cells = [
            "[dim]absent[/]"
            if imp[k][i] is None
            else f"[green]{imp[k][i]:.4f}[/]"
            if i in lowest[k]
            else f"{imp[k][i]:.4f}"
            for k in kinds
        ]
        if plan is not None:
            cells.append(
                " ".join(k for k, v in (("block", plan.blocks), ("attn", plan.attn), ("mlp", plan.mlp)) if i in v)
            )
        table.add_row(str(i), *cells)
    return table


def plot_scores(scores, path, plan=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    layers = list(range(scores.num_layers))
    for kind, style in (("attn", "o-"), ("mlp", "s-"), ("block", "^-")):
        if kind not in scores.importance:  # a metric that does not score it (gate-norm: attention only)
            continue
        values = [float("nan") if v is None else v for v in scores.importance[kind]]  # absent parts: a gap
        ax.plot(layers, values, style, markersize=4, label=kind)
    if plan is not None:
        for kind, color in (("attn", "C0"), ("mlp", "C1"), ("blocks", "C2")):
            for i in getattr(plan, kind):
                ax.axvline(i, color=color, alpha=0.15, linewidth=6)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel(
        {"cosine": "importance (1 - cos)", "gate-norm": "query-key coupling (gate-norm)"}.get(
            scores.metric, "importance (angular distance)"
        )
    )
    calib = scores.calibration
    ax.set_title(
        f"{scores.model}: {calib.get('source')} calibration, {calib.get('tokens'):,} tokens"
        if calib
        else f"{scores.model}: from the weights alone ({scores.metric})"
    )
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)
