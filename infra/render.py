"""Render the manifests under infra/ with one values file: `${KEY}` -> its value, nothing else touched.

    python infra/render.py                                # infra/values.env -> build/infra/
    python infra/render.py --values site.env --out DIR    # site.env overrides infra/values.env
    python infra/render.py --set IMAGE_TAG=3f2c1ab        # single overrides (repeatable)

The placeholder syntax is envsubst's, so `envsubst "$(sed -n 's/^\\([A-Z_0-9]*\\)=.*/${\\1}/p' infra/values.env)"`
renders the same. Only `${UPPER_CASE}` is a placeholder: shell variables inside manifests are written `$NAME`
(and Kubernetes' own `$(NAME)`), so they pass through. A placeholder without a value is an error, never "".
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parent
TEMPLATE_DIRS = ("k8s", "ray")  # what gets rendered: every *.yaml below these
PLACEHOLDER = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")


class RenderError(ValueError):
    """A values file or template that cannot be rendered."""


def load_values(paths: list[Path], overrides: list[str] = ()) -> dict[str, str]:
    """KEY=value files, later ones overriding earlier ones, then KEY=value overrides."""
    values: dict[str, str] = {}
    for path in paths:
        for n, raw in enumerate(Path(path).read_text().splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if "=" not in line:
                raise RenderError(f"{path}:{n}: expected KEY=value, got {raw!r}")
            key, value = line.split("=", 1)
            if not re.fullmatch(r"[A-Z][A-Z0-9_]*", key):
                raise RenderError(f"{path}:{n}: {key!r} is not an UPPER_CASE key")
            values[key] = value
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise RenderError(f"override {item!r} is not KEY=value")
        values[key] = value
    return values


def render_text(text: str, values: dict[str, str], source: str = "<text>") -> str:
    missing = sorted({m for m in PLACEHOLDER.findall(text) if m not in values})
    if missing:
        raise RenderError(f"{source}: no value for {', '.join(missing)}: add them to infra/values.env")
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], text)


def templates() -> list[Path]:
    return sorted(p for d in TEMPLATE_DIRS for p in (INFRA / d).rglob("*.yaml"))


def render_all(values: dict[str, str]) -> dict[Path, str]:
    """Template path relative to infra/ -> rendered text."""
    return {p.relative_to(INFRA): render_text(p.read_text(), values, str(p)) for p in templates()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--values", action="append", default=[], help="extra values file(s), overriding values.env"
    )
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="KEY=value override")
    ap.add_argument("--out", default="build/infra", help="output folder (default build/infra)")
    args = ap.parse_args(argv)
    try:
        values = load_values([INFRA / "values.env", *map(Path, args.values)], args.overrides)
        rendered = render_all(values)
    except RenderError as exc:
        print(f"render.py: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    for rel, text in rendered.items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text(text)
        print(out / rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())
