"""Text and JSON views of decisions and of this machine, shared by the API and the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnrt.errors import RegistryError
from attnrt.selection import capability, registry
from attnrt.selection.device import probe, probe_report
from attnrt.selection.request import AttentionRequest

if TYPE_CHECKING:
    from attnrt.selection.dispatch import Decision
    from attnrt.selection.manifest import Rule


def format_decision(d: Decision) -> str:
    lines = [f"request:  {d.request.describe()}",
             f"device:   {d.device.describe()}{_assumed(d.device)}",
             f"rule:     {d.rule_where}" + (f"  [{d.rule.conditions()}]" if d.rule else ""),
             f"          provenance: {_provenance(d.rule)}"]
    if d.forced:
        lines.append(f"forced:   {d.forced}")
    lines.append(f"chosen:   {d.backend or 'none (nothing can run this request)'}")
    lines.append("candidates:")
    for c in d.candidates:
        mark = "*" if c.name == d.backend else ("-" if c.reached else " ")
        note = f"  [{c.note}]" if c.note else ""
        note += _assumed_packages(c.name) if d.device.packages_assumed and c.ok else ""
        lines.append(f"  {mark} {c.name:<22} {c.verdict()}{note}")
    lines += [f"note:     {n}" for n in d.notes]
    return "\n".join(lines)


def _assumed(device: Any) -> str:
    return ("; packages assumed installed (ATTNRT_SIMULATED_PACKAGES=local checks this "
            "machine's)" if device.packages_assumed else "")


def _assumed_packages(name: str) -> str:
    """Which packages a candidate on a simulated device was assumed to find installed."""
    try:
        modules = [p.module for p in capability.declared(registry.load(name), "PACKAGES")]
    except (RegistryError, ImportError):
        return ""
    return f"  [assumes {', '.join(modules)} installed]" if modules else ""


_KIND_LABELS = {"measured": "measured on hardware", "published": "from published figures, "
                "untested here", "untested": "untested"}


def _provenance(rule: Rule | None) -> str:
    if rule is None:
        return "untested (no rule matched)"
    label = _KIND_LABELS[rule.provenance_kind]
    return label if rule.provenance_kind == "untested" else f"{label}; {rule.provenance}"


def decision_dict(d: Decision) -> dict[str, Any]:
    return {
        "chosen": d.backend,
        "request": {"head_size": d.request.head_size, "dtype": d.request.dtype,
                    "num_heads": d.request.num_heads, "num_kv_heads": d.request.kv_heads,
                    "causal": d.request.causal, "allowed": d.request.allowed,
                    "grad": d.request.grad, "seq_len": d.request.seq_len,
                    "method": d.request.method},
        "device": d.device.to_dict(),
        "rule": ({"where": d.rule.where, "conditions": d.rule.conditions(),
                  "provenance": d.rule.provenance,
                  "provenance_kind": d.rule.provenance_kind} if d.rule else None),
        "forced": d.forced,
        "candidates": [c.to_dict() for c in d.candidates],
        "notes": list(d.notes),
    }


def backend_rows() -> list[dict[str, Any]]:
    """Every registered backend: origin, declared limits, package availability and versions."""
    rows, device = [], probe()
    for name in registry.names():
        spec = registry.spec(name)
        row: dict[str, Any] = {"name": name, "target": spec.target, "origin": spec.origin}
        try:
            cls = registry.load(name)
        except RegistryError as exc:
            rows.append({**row, "available": False, "problems": [str(exc)]})
            continue
        problems: list[str] = []
        versions: dict[str, str | None] = {}
        for pkg in capability.declared(cls, "PACKAGES"):
            if device.packages_assumed:  # a simulated device: as explain, assume it is there
                versions[pkg.module] = "assumed installed"
                continue
            status = capability.package_status(pkg)
            versions[pkg.module] = status.version
            if status.reason:
                problems.append(str(status.reason))
        platforms = capability.declared(cls, "PLATFORMS")
        problems += _device_problems(cls, name, device)
        rows.append({**row, "available": not problems, "problems": problems,
                     "versions": versions,
                     "methods": sorted(capability.declared(cls, "METHODS")),
                     "platforms": sorted(platforms) if platforms else ["any"]})
    return rows


def _device_problems(cls: type, name: str, device: Any) -> list[str]:
    """Why `cls` cannot run on this device at all (platform, arch), as explain would say: so
    "available" in info means what a decision would find."""
    request = AttentionRequest(64, next(iter(sorted(capability.declared(cls, "DTYPES"))), "fp32"),
                               method=sorted(capability.declared(cls, "METHODS"))[0])
    reasons = capability.check_device(cls, name, request, device)
    extra = getattr(cls, "extra_reasons", None)
    if not reasons and callable(extra):  # a platform limit that is not data (VSA's CPU path)
        reasons = [r for r in extra(request, device) if r.code in (capability.PLATFORM,
                                                                   capability.ARCH)]
    return [str(r) for r in reasons]


def _forced() -> dict[str, Any] | None:
    from attnrt.selection.dispatch import forced_backend

    forced = forced_backend()
    if forced is None:
        return None
    name, where = forced
    error = None if registry.is_registered(name) else (
        f"{where}: unknown backend {name!r}; registered: {', '.join(registry.names())}")
    return {"name": name, "where": where, "error": error}


def info_dict() -> dict[str, Any]:
    from attnrt.selection.manifest import current_manifest, manifest_files

    device = probe()
    manifest = current_manifest()
    forced = _forced()
    return {
        "device": device.to_dict(),
        "forced": forced,
        "forced_error": forced["error"] if forced else None,
        "platforms": [{"platform": p, "available": dev is not None, "reason": reason,
                       "device": dev.to_dict() if dev else None}
                      for p, dev, reason in probe_report()],
        "backends": backend_rows(),
        "manifest_files": list(manifest_files()),
        "rules": [{"where": r.where, "conditions": r.conditions(), "rank": list(r.rank),
                   "provenance": r.provenance, "provenance_kind": r.provenance_kind,
                   "label": _provenance(r)} for r in manifest.rules
                  if not r.platforms or device.platform in r.platforms],
    }


def format_info(info: dict[str, Any]) -> str:
    dev = info["device"]
    sim = " (simulated)" if dev["simulated"] else ""
    lines = [f"device: {dev['platform']}:{dev['arch']} {dev['name']}{sim}".rstrip()]
    lines += [f"  {k}: {v}" for k, v in dev["versions"].items()]
    lines.append("platforms probed (in order):")
    lines += [f"  {p['platform']:<5} {'yes' if p['available'] else 'no '}  {p['reason']}"
              for p in info["platforms"]]
    forced = info.get("forced")
    if forced:
        lines.append(f"forced: {forced['name']} ({forced['where']})"
                     + (f"\n  error: {forced['error']}" if forced["error"] else ""))
    lines.append("backends:")
    for b in info["backends"]:
        state = "available" if b["available"] else "unavailable: " + "; ".join(b["problems"])
        versions = " ".join(f"{k} {v}" for k, v in b.get("versions", {}).items() if v)
        methods = [m for m in b.get("methods", ["dense"]) if m != "dense"]
        method = f"[{','.join(methods)}] " if methods else ""
        lines.append(f"  {b['name']:<22} {method}{state}"
                     f"{'  (' + versions + ')' if versions else ''}")
    lines.append("manifest files (first wins):")
    lines += [f"  {f}" for f in info["manifest_files"]]
    lines.append(f"rules for {dev['platform']}{sim}:")
    lines += [f"  {r['where']}: {r['conditions']} -> {', '.join(r['rank'])}  [{r['label']}]"
              for r in info["rules"]]
    return "\n".join(lines)
