"""The linter's result: :class:`Finding` (one observation about one node) and :class:`LintReport` (the findings,
the statistics, the one-line summary, the JSON form and the text table)."""
from __future__ import annotations

import dataclasses
import textwrap

__all__ = ["Finding", "LintReport", "SEVERITIES", "MISMATCH_CODES", "REFORMAT_CODES"]

SEVERITIES = ("error", "warning", "info")
# The finding codes that predict a requantize or reformat layer in the engine.
MISMATCH_CODES = {"concat-scale-mismatch", "add-scale-mismatch", "commuting-scale-mismatch", "multi-scale-tensor"}
REFORMAT_CODES = MISMATCH_CODES | {"requantize-chain", "commuting-partial", "add-not-fused"}


@dataclasses.dataclass
class Finding:
    """One observation about one node.

    Args:
        severity (str): ``"error"`` (TensorRT rejects or mis-computes it), ``"warning"`` (costs speed or
            INT8 coverage) or ``"info"``.
        code (str): a stable short identifier, e.g. ``"concat-scale-mismatch"``.
        node (str): the node's name (``"<op>#<index>"`` when the ONNX node has no name).
        message (str): what is wrong.
        fix (str): how to fix it. Empty for purely informative findings.
        op (str): the node's op type. Defaults to "".
    """

    severity: str
    code: str
    node: str
    message: str
    fix: str = ""
    op: str = ""

    def __post_init__(self):
        if self.severity not in SEVERITIES:
            raise ValueError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")

    @property
    def reformat(self) -> bool:
        """True when the finding predicts a requantize or reformat layer in the TensorRT engine."""
        return self.code in REFORMAT_CODES

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "reformat": self.reformat}


@dataclasses.dataclass
class LintReport:
    """The linter's result: a list of findings and a dict of statistics (coverage, counts, float layers)."""

    findings: list = dataclasses.field(default_factory=list)
    stats: dict = dataclasses.field(default_factory=dict)
    model: str = ""

    @property
    def errors(self) -> list:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list:
        return [f for f in self.findings if f.severity == "warning"]

    def by_code(self, code: str) -> list:
        """All findings with the given code."""
        return [f for f in self.findings if f.code == code]

    def summary(self) -> str:
        """One line: coverage, mismatches, requantize chains, reformat sites, errors and warnings."""
        s = self.stats
        cov = s.get("int8_coverage")
        text = "coverage n/a (no weighted ops with known shapes)" if cov is None else \
            f"coverage {100 * cov:.1f}% of MACs INT8"
        if s.get("skipped_float_layers"):
            excl = s.get("int8_coverage_excluding_skipped")
            excl_txt = "n/a" if excl is None else f"{100 * excl:.1f}%"
            text += f" ({excl_txt} excluding {s['skipped_float_layers']} skipped float layers)"
        text += (f", {s.get('int8_layers', 0)}/{s.get('weighted_layers', 0)} weighted layers INT8"
                 f", {s.get('scale_mismatches', 0)} scale mismatches"
                 f", {s.get('requantize_chains', 0)} requantize chains"
                 f", {s.get('reformat_sites', 0)} predicted requantize/reformat sites"
                 f", {len(self.errors)} errors, {len(self.warnings)} warnings")
        sp = s.get("sparsity") or {}
        if sp.get("holding_2_4"):  # (said only when some conv holds 2:4: dense models keep their one line)
            ready = sp.get("ready_fraction")
            text += (f", 2:4-ready {sp['ready']}/{sp['convs']} convs"
                     f" ({'n/a' if ready is None else f'{100 * ready:.1f}%'} of conv MACs)")
        return text

    def format_sparsity(self) -> str:
        """One line per conv: whether its weights hold 2:4 and whether it is large enough for sparse kernels."""
        sp = self.stats.get("sparsity") or {}
        lines = [f"2:4 sparsity (ready: holds 2:4 and >= {sp.get('min_channels')} input and output channels):"]
        for la in sp.get("layers", []):
            pattern = "2:4" if la["holds_2_4"] else ("dense" if la["weights_known"] else "weights unknown")
            size = "large enough" if la["large_enough"] else "too small"
            lines.append(f"  {la['node']}: {la['in_channels']}->{la['out_channels']} ch, {pattern}, {size}, "
                         f"{la['macs']:,} MACs")
        ready = sp.get("ready_fraction")
        lines.append(f"  {sp.get('ready', 0)} of {sp.get('convs', 0)} convs 2:4-ready: "
                     f"{'n/a' if ready is None else f'{100 * ready:.1f}%'} of conv MACs")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"model": self.model, "summary": self.summary(), "stats": self.stats,
                "findings": [f.to_dict() for f in self.findings]}

    def format_table(self, show_int8: bool = False, width: int = 48, show_sparsity: bool | None = None) -> str:
        """Render the findings as a text table (severity, node, op, finding, fix) followed by the summary.

        Args:
            show_int8 (bool): also list the ``int8-eligible`` rows of healthy layers. Defaults to False.
            width (int): wrap width of the finding and fix columns. Defaults to 48.
            show_sparsity (bool | None): list every conv's 2:4 state. Defaults to doing so when some conv holds 2:4.
        """
        order = {sev: i for i, sev in enumerate(SEVERITIES)}
        rows = [f for f in self.findings if show_int8 or f.code != "int8-eligible"]
        rows.sort(key=lambda f: order[f.severity])
        header = ("SEVERITY", "NODE", "OP", "FINDING", "FIX")
        cells = []
        for f in rows:
            node = f.node if len(f.node) <= 60 else "..." + f.node[-57:]
            cells.append((f.severity, node, f.op, textwrap.wrap(f"[{f.code}] {f.message}", width) or [""],
                          textwrap.wrap(f.fix, width) or ["-"]))
        w_sev = max([len(header[0])] + [len(c[0]) for c in cells])
        w_node = max([len(header[1])] + [len(c[1]) for c in cells])
        w_op = max([len(header[2])] + [len(c[2]) for c in cells])
        w_msg = max([len(header[3])] + [len(line) for c in cells for line in c[3]])
        lines = [f"{header[0]:<{w_sev}}  {header[1]:<{w_node}}  {header[2]:<{w_op}}  {header[3]:<{w_msg}}  "
                 f"{header[4]}"]
        lines.append("-" * len(lines[0]))
        for sev, node, op, msg, fix in cells:
            for i in range(max(len(msg), len(fix))):
                first = i == 0
                lines.append(f"{sev if first else '':<{w_sev}}  {node if first else '':<{w_node}}  "
                             f"{op if first else '':<{w_op}}  {msg[i] if i < len(msg) else '':<{w_msg}}  "
                             f"{fix[i] if i < len(fix) else ''}".rstrip())
        if not cells:
            lines.append("(no findings)")
        float_layers = self.stats.get("float_layers") or []
        if float_layers:
            lines.append("")
            lines.append("float layers (MACs at batch 1):")
            for layer in float_layers:
                tag = " [skipped on purpose]" if layer["skipped"] else ""
                lines.append(f"  {layer['node']} ({layer['op']}): {layer['macs']:,} MACs, {layer['reason']}{tag}")
        if show_sparsity or (show_sparsity is None and (self.stats.get("sparsity") or {}).get("holding_2_4")):
            lines.append("")
            lines.append(self.format_sparsity())
        lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)
