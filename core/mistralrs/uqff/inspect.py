"""Looking at UQFF exports without loading a model (``mistralrs uqff report|verify|inspect``).

    groups = shard_groups(directory, quant=None)      # {stem: [shard paths]}
    layers = describe(paths, registry)                 # per record: key, family, stored type, shape
    problems = verify(directory, quant, ...)           # [] when every check passes

`verify` runs every check the loader makes before a weight is used (readable shards, version
entries, records whose entries match their family, a family some installed quantizer reads,
residual.safetensors and config.json beside the shards) and, with `strict`, wants
uqff_report.json and no fallback layers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mistralrs.errors import ModelLoadError
from mistralrs.uqff import container as C


def shard_groups(directory: Path, quant: str | None = None, *, registry: Any = None) -> dict[str, list[Path]]:
    """The shard sets of an export directory by stem (``q4k`` -> [q4k-0.uqff, ...]); `quant` picks
    one (a type name, a bit count or a stem)."""
    directory = Path(directory)
    if directory.is_file():
        directory = directory.parent
    groups: dict[str, list[tuple[int, Path]]] = {}
    for p in sorted(directory.glob("*.uqff")):
        parsed = C.parse_shard_name(p.name)
        if parsed is not None:
            groups.setdefault(parsed[0], []).append((parsed[1], p))
    out = {stem: [p for _, p in sorted(items)] for stem, items in sorted(groups.items())}
    if quant and quant != "all":
        wanted = quant
        if wanted not in out:
            from mistralrs.errors import ConfigError
            from mistralrs.quantization import resolve_isq_type

            try:
                wanted = resolve_isq_type(quant, registry=registry, source="--quant").name
            except ConfigError:
                pass
        if wanted not in out:
            raise ModelLoadError(f"{directory}: no {quant!r} shard set (it has: {', '.join(out) or 'none'})")
        out = {wanted: out[wanted]}
    if not out:
        raise ModelLoadError(f"{directory}: no <stem>-<N>.uqff shards here")
    return out


def describe(paths: list[Path], registry: Any = None, *, allow_newer_minor: bool = False) -> list[dict[str, Any]]:
    """Every record of the shards: key, family tag, stored type and weight shape (raises the
    loader's one-line errors for a bad shard or record)."""
    from mistralrs.uqff.loading import UqffSet, _family_class

    if registry is None:
        from mistralrs.plugins import get_registry

        registry = get_registry()
    uq = UqffSet.open(paths, allow_newer_minor=allow_newer_minor, need_residual=False)
    try:
        rows = []
        for key in uq.records:
            tag = uq.tag(key)
            entries = uq.entries(key, small_only=True)
            shape = list(entries["weight"].shape) if "weight" in entries else []
            vec = entries.get("weight.shape")
            if vec is not None and hasattr(vec, "tolist"):
                shape = [int(v) for v in vec.tolist()]
            if tag == C.UNQUANT:
                stored = str(getattr(entries.get("weight"), "dtype", "float")).removeprefix("torch.")
            else:
                cls = _family_class(registry, tag, key, uq.where(key))
                try:
                    stored = cls.uqff_qtype(entries) or "float"
                except ValueError as exc:
                    raise ModelLoadError(f"{uq.where(key)}: layer {key!r}: {exc}") from None
            rows.append({"module": key, "format": tag, "stored": stored, "shape": shape, "file": uq.where(key).name})
        return rows
    finally:
        uq.close()


def report_for(directory: Path, quant: str | None = None, registry: Any = None) -> dict[str, Any]:
    """A uqff_report.json (schema 1) made from the files themselves."""
    from mistralrs import __version__

    outputs = []
    for stem, paths in shard_groups(directory, quant, registry=registry).items():
        rows = describe(paths, registry)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["stored"]] = counts.get(r["stored"], 0) + 1
        outputs.append({"quant": stem, "shards": [p.name for p in paths], "layers": len(rows),
                        "actual_counts": counts, "fallback_count": 0,
                        "layer_details": [{"module": r["module"], "stored": r["stored"], "shape": r["shape"]}
                                          for r in rows]})
    return {"schema": 1, "generated_by": {"tool": "mistralrs uqff report", "mistralrs_version": __version__},
            "uqff_version": ".".join(map(str, C.VERSION)), "outputs": outputs}


def verify(directory: Path, quant: str | None = None, *, strict: bool = False, allow_newer_minor: bool = False,
           registry: Any = None) -> tuple[list[str], dict[str, Any]]:
    """(problems, summary): every problem a one-line message; none when the export loads."""
    directory = Path(directory)
    base = directory.parent if directory.is_file() else directory
    problems: list[str] = []
    summary: dict[str, Any] = {}
    try:
        groups = shard_groups(directory, quant, registry=registry)
    except ModelLoadError as exc:
        return [str(exc)], summary
    for stem, paths in groups.items():
        try:
            rows = describe(paths, registry, allow_newer_minor=allow_newer_minor)
            counts: dict[str, int] = {}
            for r in rows:
                counts[r["stored"]] = counts.get(r["stored"], 0) + 1
            summary[stem] = {"shards": [p.name for p in paths], "layers": len(rows), "stored": counts}
        except ModelLoadError as exc:
            problems.append(str(exc))
    for needed in (C.RESIDUAL, "config.json"):
        if not (base / needed).is_file():
            problems.append(f"{base / needed}: missing; the export cannot load without it")
    report = base / C.REPORT
    if strict:
        if not report.is_file():
            problems.append(f"{report}: missing (--strict wants the report the writer leaves)")
        else:
            try:
                data = json.loads(report.read_text(encoding="utf-8"))
                fallbacks = sum(int(o.get("fallback_count", 0)) for o in data.get("outputs", []))
                if fallbacks:
                    problems.append(f"{report}: {fallbacks} fallback layer(s) (--strict refuses them)")
            except (OSError, ValueError) as exc:
                problems.append(f"{report}: unreadable ({exc})")
    return problems, summary
