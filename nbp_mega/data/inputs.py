"""What to preprocess: video inputs from a folder tree, a CSV/TSV table or a plain list.

Inputs (`list_inputs(spec)`; relative paths are taken from `root`, by default the folder that
holds the list, or the tree itself):
  folder tree   every video file below it (by extension). layout "classes": the first
                sub-folder is the class (UCF-101: ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi);
                "split-classes": split/class/file (train/abseiling/x.mp4); "flat": no
                labels; "auto": split-classes when every top folder is a split name (train,
                val, validation, test), else classes when videos sit in sub-folders, else flat.
  .csv / .tsv   a header row, then one video per row. Columns (case-insensitive, aliases in
                brackets): path, or youtube_id with time_start and time_end (Kinetics: the
                file <youtube_id>_<start:06d>_<end:06d>.mp4 under root, root/<label>/ or
                root/<split>/<label>/; the times name the file, the clip is not trimmed);
                label [class, label_name]; caption [text]; start [start_time] and end
                [end_time] in seconds (path rows only: read only that part); split [subset].
  anything else one path per line; blank lines and '#' comments ignored; a trailing integer
                column (UCF-101's trainlist01.txt) is ignored. The folders of a path below
                root name its class (and split) as in a tree, with the same layouts; a path
                outside root has no label.
A row that cannot be used (no path, a bad number, a listed-twice path) becomes a Rejected
entry with the reason; it never stops the listing.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import asdict, dataclass

from nbp_mega.data.video import VIDEO_EXTENSIONS

SPLIT_NAMES = ("train", "val", "validation", "test")
LAYOUTS = ("auto", "classes", "split-classes", "flat")
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # split names become folder names
_ALIASES = {"label": ("label", "class", "label_name"), "caption": ("caption", "text"),
            "start": ("start", "start_time"), "end": ("end", "end_time"),
            "split": ("split", "subset")}


class InputError(ValueError):
    """The input specification as a whole is unusable (missing, no header, no videos)."""


@dataclass(frozen=True)
class VideoInput:
    path: str  # the file to open
    source: str  # how metadata names it: the path relative to the input root when inside it
    split: str
    label_name: str | None = None
    caption: str | None = None
    start: float | None = None  # seconds from the first frame (None = from the beginning)
    end: float | None = None  # seconds from the first frame (None = to the end)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Rejected:
    source: str  # the path or "<list file>:<line>"
    split: str
    reason: str


def list_inputs(spec: str, *, root: str | None = None, split: str = "train",
                layout: str = "auto") -> tuple[list[VideoInput], list[Rejected]]:
    """The usable inputs named by `spec` (in listing order) and the rejected ones."""
    if layout not in LAYOUTS:
        raise InputError(f"layout {layout!r}: expected one of {', '.join(LAYOUTS)}")
    _check_split(split, f"split {split!r}")
    if os.path.isdir(spec):
        found, rejected = _from_tree(spec, split, layout), []
    elif not os.path.isfile(spec):
        raise InputError(f"input {spec!r} does not exist: expected a folder of videos, a .csv "
                         f"or .tsv table, or a text file with one path per line")
    elif spec.lower().endswith((".csv", ".tsv")):
        found, rejected = _from_table(spec, root or os.path.dirname(spec) or ".", split)
    else:
        found, rejected = _from_list(spec, root or os.path.dirname(spec) or ".", split, layout)
    return _drop_duplicates(found, rejected)


def _check_split(name: str, where: str) -> None:
    if not _SPLIT_RE.match(name) or name == "raw":
        raise InputError(f"{where}: a split name must be letters, digits, '_' or '-' (it "
                         f"names a folder) and not 'raw'")


def _source(path: str, root: str) -> str:
    if _outside(path, root):
        return os.path.abspath(path)
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root))


# -- folder tree -----------------------------------------------------------------------------
def _from_tree(root: str, split: str, layout: str) -> list[VideoInput]:
    files = []
    for folder, dirs, names in os.walk(root):
        dirs.sort()
        files += [os.path.join(folder, n) for n in sorted(names)
                  if n.lower().endswith(VIDEO_EXTENSIONS)]
    if not files:
        raise InputError(f"folder {root} holds no video files (looked for "
                         f"{', '.join(VIDEO_EXTENSIONS)})")
    parts = [os.path.relpath(f, root).split(os.sep) for f in files]
    if layout == "auto":
        layout = _guess_layout(parts)
    return [_tree_input(f, p, root, split, layout) for f, p in zip(files, parts, strict=True)]


def _guess_layout(parts: list[list[str]]) -> str:
    tops = {p[0] for p in parts if len(p) > 1}
    if tops and all(len(p) > 2 for p in parts) and tops <= set(SPLIT_NAMES):
        return "split-classes"
    return "classes" if tops else "flat"


def _tree_input(path: str, parts: list[str], root: str, split: str, layout: str) -> VideoInput:
    label = None
    if layout == "classes" and len(parts) > 1:
        label = parts[0]
    elif layout == "split-classes" and len(parts) > 2:
        split, label = parts[0], parts[1]
    return VideoInput(path=path, source=_source(path, root), split=split, label_name=label)


# -- plain list ------------------------------------------------------------------------------
def _from_list(spec: str, root: str, split: str, layout: str):
    lines = []
    with open(spec, encoding="utf-8-sig", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(re.sub(r"\s+\d+$", "", line))  # UCF-101 lists: "Class/v_x.avi 1"
    if not lines:
        raise InputError(f"list {spec} names no videos (expected one path per line)")
    paths = [os.path.join(root, line) for line in lines]
    # Folders in a line play the part they play in a tree (class, or split/class); a path
    # outside root carries no label.
    parts = [_source(p, root).split(os.sep) if not _outside(p, root) else [os.path.basename(p)]
             for p in paths]
    if layout == "auto":
        layout = _guess_layout(parts)
    return [_tree_input(f, p, root, split, layout) for f, p in zip(paths, parts, strict=True)], []


def _outside(path: str, root: str) -> bool:
    return os.path.relpath(os.path.abspath(path), os.path.abspath(root)).startswith("..")


# -- CSV / TSV -------------------------------------------------------------------------------
def _from_table(spec: str, root: str, split: str):
    with open(spec, encoding="utf-8-sig", newline="") as f:  # -sig: a BOM is no header
        reader = csv.DictReader(f, delimiter="\t" if spec.lower().endswith(".tsv") else ",")
        header = [(h or "").strip().lower() for h in reader.fieldnames or []]
        if "path" not in header and "youtube_id" not in header:
            raise InputError(f"table {spec}: header {header} has no 'path' (or 'youtube_id') "
                             f"column; expected e.g. 'path,label,caption,start,end,split'")
        found, rejected = [], []
        for n, row in enumerate(reader, 2):
            row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()
                   if isinstance(v, str)}
            try:
                found.append(_table_input(row, root, split))
            except ValueError as e:
                where = f"{spec}:{n}"
                rejected.append(Rejected(source=where, split=row.get("split") or split,
                                         reason=f"row {n}: {e}"))
    if not found and not rejected:
        raise InputError(f"table {spec} has a header but no rows")
    return found, rejected


def _column(row: dict, name: str) -> str:
    return next((row[a] for a in _ALIASES[name] if row.get(a)), "")


def _seconds(text: str, name: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{name} {value} is negative; expected seconds >= 0")
    return value


def _table_input(row: dict, root: str, default_split: str) -> VideoInput:
    split = _column(row, "split") or default_split
    if not _SPLIT_RE.match(split) or split == "raw":
        raise ValueError(f"split {split!r} is not a usable folder name (letters, digits, "
                         f"'_' or '-', not 'raw')")
    label = _column(row, "label") or None
    if row.get("path"):
        path = os.path.join(root, row["path"])
        start, end = _seconds(_column(row, "start"), "start"), _seconds(_column(row, "end"), "end")
        if start is not None and end is not None and end <= start:
            raise ValueError(f"end {end} is not after start {start}")
    elif row.get("youtube_id"):
        path, start, end = _kinetics_file(row, root, split, label), None, None
    else:
        raise ValueError("no path (empty 'path' and 'youtube_id' columns)")
    return VideoInput(path=path, source=_source(path, root), split=split, label_name=label,
                      caption=_column(row, "caption") or None, start=start, end=end)


def _kinetics_file(row: dict, root: str, split: str, label: str | None) -> str:
    """The downloaded clip of a Kinetics row: <id>_<start:06d>_<end:06d>.mp4 somewhere usual."""
    times = [_seconds(row.get(c, ""), c) for c in ("time_start", "time_end")]
    if None in times:
        raise ValueError("a youtube_id row needs time_start and time_end to name its file")
    name = f"{row['youtube_id']}_{int(times[0]):06d}_{int(times[1]):06d}.mp4"
    places = [os.path.join(root, name)]
    if label:
        places += [os.path.join(root, label, name), os.path.join(root, split, label, name)]
    return next((p for p in places if os.path.isfile(p)), places[0])


# -- duplicates and labels -------------------------------------------------------------------
def _drop_duplicates(found: list[VideoInput], rejected: list[Rejected]):
    seen: set[str] = set()
    kept = []
    for item in found:
        where = (os.path.abspath(item.path), item.start, item.end)
        if where in seen:
            rejected.append(Rejected(item.source, item.split, "listed twice (kept the first)"))
            continue
        seen.add(where)
        kept.append(item)
    return kept, rejected


def build_label_map(inputs: list[VideoInput], given: str | None = None
                    ) -> tuple[dict[str, int], list[VideoInput], list[Rejected]]:
    """(class name -> id, inputs whose class is known, rejected ones). Without `given` the
    ids number the sorted class names; with it (a manifest or JSON {name: id}, or a text file
    of one name per line) ids stay fixed across runs, e.g. for a test split done later."""
    if given is None:
        names = sorted({i.label_name for i in inputs if i.label_name is not None})
        return {n: k for k, n in enumerate(names)}, inputs, []
    labels = read_label_map(given)
    kept = [i for i in inputs if i.label_name is None or i.label_name in labels]
    rejected = [Rejected(i.source, i.split, f"class {i.label_name!r} is not in the label map "
                         f"{given}") for i in inputs if i.label_name not in labels and
                i.label_name is not None]
    return labels, kept, rejected


def read_label_map(path: str) -> dict[str, int]:
    """{class name: id} from a manifest.json, a JSON object, or one class name per line."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InputError(f"label map {path}: cannot read it ({e})") from None
    if path.lower().endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"label map {path}: not valid JSON ({e})") from None
        data = data.get("label_map", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or not all(isinstance(v, int) for v in data.values()):
            raise InputError(f"label map {path}: expected a JSON object {{class name: int id}} "
                             f"or a manifest with 'label_map'")
        return dict(data)
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise InputError(f"label map {path}: a class name appears twice")
    return {n: k for k, n in enumerate(names)}
