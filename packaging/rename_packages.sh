#!/usr/bin/env bash
# Move the top-level packages protocols/, runtimes/ and hwprobe/ under synord/
# (synord.protocols, synord.runtimes, synord.hwprobe), so that an installed wheel
# has one top-level import name, and rewrite every reference to them.
#
#   packaging/rename_packages.sh [CHECKOUT]     (default: this checkout)
#
# Idempotent: run it again (e.g. after merging branches that still added files or
# imports under the old names) and it moves what is left and rewrites what is new;
# on an already renamed tree it changes nothing. It ends with checks: no old
# import left, every module compiles, and synord.protocols / synord.runtimes /
# synord.hwprobe still import nothing else of synord (the layering rule).
#
# What it rewrites (in *.py, *.md, *.toml, *.sh, *.cfg, *.txt, *.in, outside .git
# and build outputs):
#   import X            -> from synord import X      (code keeps using the name X)
#   import X.sub        -> import synord.X.sub
#   from X[.sub] import -> from synord.X[.sub] import
#   -m X[.sub]          -> -m synord.X[.sub]          (also "-m", "X" in argv lists)
#   X.sub (a real module of X) in strings, comments and docs -> synord.X.sub
#   X/... paths in strings, comments and docs -> synord/X/...
# In Python code (outside strings and comments) a dotted X.sub is left alone:
# there X is the module bound by `from synord import X`.
set -euo pipefail
cd "${1:-$(dirname "$0")/..}"
[ -f pyproject.toml ] && [ -d synord ] || { echo "rename_packages: not a synord checkout: $PWD" >&2; exit 1; }
PKGS="protocols runtimes hwprobe"
tracked() { git ls-files --error-unmatch "$1" >/dev/null 2>&1; }

# 1. Move (git mv when tracked), file by file so that a partly moved tree completes.
for p in $PKGS; do
  [ -d "$p" ] || continue
  while IFS= read -r -d '' f; do
    case "$f" in */__pycache__/*|*.pyc) continue ;; esac
    dest="synord/$f"
    mkdir -p "$(dirname "$dest")"
    if [ -e "$dest" ]; then
      if cmp -s "$f" "$dest"; then
        if tracked "$f"; then git rm -q "$f"; else rm -f "$f"; fi
      else
        echo "rename_packages: both $f and $dest exist and differ: merge them by hand" >&2; exit 1
      fi
    elif tracked "$f"; then
      git mv "$f" "$dest"
    else
      mv "$f" "$dest"
    fi
  done < <(find "$p" -type f -print0)
  find "$p" -name __pycache__ -type d -prune -exec rm -rf {} +
  find "$p" -depth -type d -empty -delete
  [ ! -e "$p" ] || echo "rename_packages: $p/ still holds files (ignored ones?): $(find "$p" -type f | head -3)" >&2
done

# 2. Rewrite references.
PY=${PYTHON:-$(command -v python3)}
"$PY" - "$PKGS" <<'EOF'
import io, re, subprocess, sys, tokenize
from pathlib import Path

PKGS = sys.argv[1].split()
SUBS = {p: sorted({f.stem for f in Path("synord", p).glob("*.py") if f.stem != "__init__"}
                  | {d.name for d in Path("synord", p).iterdir() if (d / "__init__.py").exists()})
        for p in PKGS}
ALT = "|".join(PKGS)
PRE = r"(?<![\w./-])"  # not inside another name or path (synord.X, a/X, self.X ...)
SUB_RE = re.compile(PRE + r"(" + ALT + r")\.(\w+)")
PATH_RE = re.compile(PRE + r"(" + ALT + r")/")
DASH_M = re.compile(r"(-m\s+)(" + ALT + r")\b(?![\w-])")
ARGV_M = re.compile(r"""(["']-m["'],\s*["'])(""" + ALT + r""")(["'.])""")
# an import statement: at a line start, after ";" or at the start of a string (code run by -c)
IMPORT = re.compile(r"""(^|;|["'])([ \t]*)import ([\w.]+(?:[ \t]+as[ \t]+\w+)?(?:[ \t]*,[ \t]*[\w.]+(?:[ \t]+as[ \t]+\w+)?)*)""",
                    re.M)
FROM = re.compile(r"(^|;|[\"'])(\s*)from (" + ALT + r")([\s.])", re.M)


def sub_ref(m):
    pkg, name = m.group(1), m.group(2)
    return f"synord.{pkg}.{name}" if name in SUBS[pkg] else m.group(0)


def import_list(m):
    lead, sp, items = m.groups()
    keep, bound = [], []
    for item in (i.strip() for i in items.split(",")):
        head = item.split()[0].split(".")[0]
        if head not in PKGS:
            keep.append(item)
        elif item == head:  # import X: the code goes on using the name X
            bound.append(head)
        else:  # import X.sub [as n]
            keep.append("synord." + item)
    if not bound and all(not i.startswith("synord.") for i in keep):
        return m.group(0)  # nothing of ours: leave the line exactly as it is
    parts = ([f"import {', '.join(keep)}"] if keep else []) + [f"from synord import {b}" for b in bound]
    return f"{lead}{sp}{'; '.join(parts)}"


def imports(text):
    text = IMPORT.sub(import_list, text)
    text = FROM.sub(lambda m: f"{m.group(1)}{m.group(2)}from synord.{m.group(3)}{m.group(4)}", text)
    text = DASH_M.sub(lambda m: f"{m.group(1)}synord.{m.group(2)}", text)
    return ARGV_M.sub(lambda m: f"{m.group(1)}synord.{m.group(2)}{m.group(3)}", text)


def bound_in(text):
    return {p for p in PKGS if re.search(r"from synord import " + p + r"\b", text)}


def prose(text, bound=frozenset()):
    """Strings, comments, docs: module references and paths. Where code in strings
    binds X (run by `python -c`), X.attr stays as it is."""
    text = PATH_RE.sub(lambda m: f"synord/{m.group(1)}/", text)
    return SUB_RE.sub(lambda m: m.group(0) if m.group(1) in bound else sub_ref(m), text)


def rewrite_py(src):
    src = imports(src)  # import lines, in code and in code-bearing strings alike
    lines = src.splitlines(keepends=True)
    offs = [0]
    for line in lines:
        offs.append(offs[-1] + len(line))
    pos = lambda rc: offs[rc[0] - 1] + rc[1]
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(src).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return src
    spans = [(pos(t.start), pos(t.end)) for t in toks if t.type in (tokenize.STRING, tokenize.COMMENT)]
    bound = bound_in("".join(src[a:b] for a, b in spans if src[a] != "#"))
    res, cur = [], 0
    for a, b in spans:
        res.append(src[cur:a])
        res.append(prose(src[a:b], bound))
        cur = b
    res.append(src[cur:])
    return "".join(res)


def rewrite_pyproject(text):
    text = re.sub(r'include = \["synord\*", "protocols\*", "runtimes\*", "hwprobe\*"\]', 'include = ["synord*"]', text)
    return re.sub(r'(?m)^hwprobe = \[', '"synord.hwprobe" = [', text)


SKIP = ("tests/assets/build/", "packaging/guest/out/", "build/", "dist/", ".venv/")
files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], capture_output=True, text=True,
                       check=True).stdout.split("\n")
changed = 0
for name in files:
    if not name or name.startswith(SKIP) or name == "packaging/rename_packages.sh":
        continue
    path = Path(name)
    if path.suffix not in (".py", ".md", ".toml", ".sh", ".cfg", ".txt", ".in") or not path.is_file():
        continue
    text = path.read_text()
    new = rewrite_py(text) if path.suffix == ".py" else imports(prose(text, bound_in(imports(text))))
    if path.name == "pyproject.toml":
        new = rewrite_pyproject(new)
    if new != text:
        path.write_text(new)
        changed += 1
print(f"rename_packages: rewrote {changed} files")
EOF

# 3. The layering rule's wording where it names the old packages.
sed -i 's/^This package never imports synord, protocols or runtimes\.$/This package never imports the rest of synord (only synord.hwprobe itself)./' \
  synord/hwprobe/__init__.py 2>/dev/null || true

# 4. Checks.
fail=0
if git grep -nE "^\s*(from|import) (protocols|runtimes|hwprobe)\b" -- '*.py' ':!packaging/rename_packages.sh'; then
  echo "rename_packages: old imports left (above)" >&2; fail=1
fi
"$PY" -m compileall -q synord tests bench >/dev/null || { echo "rename_packages: compileall failed" >&2; fail=1; }
"$PY" - <<'EOF' || fail=1
import ast, sys
from pathlib import Path
LOW = ("synord.protocols", "synord.runtimes", "synord.hwprobe")
bad = []
for pkg in LOW:
    for f in Path(*pkg.split(".")).rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] if node.module != "synord" else [f"synord.{a.name}" for a in node.names]
            for n in names:
                if (n == "synord" or n.startswith("synord.")) and not n.startswith(LOW):
                    bad.append(f"{f}:{node.lineno}: imports {n}")
if bad:
    print("rename_packages: layering broken (protocols/runtimes/hwprobe must not import the rest of synord):",
          *bad, sep="\n  ", file=sys.stderr)
    sys.exit(1)
EOF
exit $fail
