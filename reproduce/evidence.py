"""The per-image evidence an accuracy is computed from, and the one derivation of top-1/top-5 from it.

Every evaluation that writes a result.json (`reproduce eval`, `reproduce table --weights`, the end
of `reproduce train`) writes beside it, atomically, `evidence.csv.gz` (the deploy form of a
training run: `evidence_deploy.csv.gz`): gzip text, deterministic (no time stamp), one line per
image of the split, sorted by image id:

    # reproduce evidence 1 {"run_dir": ..., "checkpoint_sha256": ..., "model": ..., "form": ..., ...}
    image,target,top5
    n01440764/ILSVRC2012_val_00000293.JPEG,0,0 391 395 394 1

`image` is the path relative to the split folder as the ImageFolder reader lists it, `target` the
class index the reader gave it, `top5` the five predicted classes, best first. 50,000 lines take
about 1 MB. result.json records the file's sha256 (`evidence.sha256`), the sha256 of the split's
sorted file list (`data.files_sha256`) and of the data root's class list (`data.classes_sha256`).

`derive` recomputes the metrics from the file and refuses, in one line, evidence that is missing or
edited (sha256), written for another run folder or checkpoint, not of the split recorded, whose
targets are not the classes their folders name (timm's ImageFolder: the class of an image is its
parent folder's name, indices in natural-sort order of the names), or whose recomputed numbers
disagree with those result.json states. The count rule (the full ImageNet-1k val) is the caller's.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
from pathlib import Path, PurePosixPath

FORMAT = 1
FILE = "evidence.csv.gz"
DEPLOY_FILE = "evidence_deploy.csv.gz"
MAGIC = "# reproduce evidence"
COLUMNS = "image,target,top5"
TOLERANCE = 1e-6  # points: the recomputed % and the stated one are the same float formula


class EvidenceError(ValueError):
    """An evidence file that cannot be read (one line)."""


def list_sha256(names) -> str:
    """sha256 of names, one a line, in the order given (callers pass them sorted or in class order)."""
    return hashlib.sha256("".join(f"{n}\n" for n in names).encode()).hexdigest()


def files_sha256(images) -> str:
    """The split's file list hash: its image ids sorted."""
    return list_sha256(sorted(images))


def class_of(image: str) -> str:
    """The class an image id names: its parent folder (timm's ImageFolder, leaf name only)."""
    parts = image.rsplit("/", 2)
    return parts[-2] if len(parts) > 1 else ""


def class_order(names) -> list[str]:
    """Class names in the order timm's ImageFolder numbers them (natural sort)."""
    import riformer  # noqa: F401  (before timm: the torchvision shim)
    from timm.utils.misc import natural_key

    return sorted(set(names), key=natural_key)


def write(path, predictions, header: dict) -> dict:
    """Write `predictions` [(image, target, [top5...]), ...] to `path` atomically (sorted by image);
    returns the record result.json keeps: {file, sha256, images}."""
    from reproduce import files

    lines = [f"{MAGIC} {FORMAT} {json.dumps(header, sort_keys=True)}", COLUMNS]
    for image, target, top5 in sorted(predictions, key=lambda p: p[0]):
        if "," in image or "\n" in image:
            raise EvidenceError(f"image id {image!r} has a comma or a newline: it cannot be written as evidence")
        lines.append(f"{image},{int(target)},{' '.join(str(int(c)) for c in top5)}")
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0, filename="") as f:
        f.write(("\n".join(lines) + "\n").encode())
    data = buffer.getvalue()
    files.atomic_write(Path(path), lambda f: f.write(data))
    return {"file": Path(path).name, "sha256": hashlib.sha256(data).hexdigest(), "images": len(predictions)}


def read(path, data: bytes | None = None) -> tuple[dict, list[tuple[str, int, list[int]]]]:
    """(header, [(image, target, top5), ...]) of an evidence file (or of its bytes `data`);
    EvidenceError names what is wrong."""
    data = Path(path).read_bytes() if data is None else data
    digest = hashlib.sha256(data).hexdigest()
    if digest not in _PARSED:  # a table reads the same run for several cells: parse each file once
        _PARSED.clear()
        _PARSED[digest] = _parse(path, data)
    header, rows = _PARSED[digest]
    return dict(header), list(rows)


_PARSED: dict[str, tuple] = {}


def _parse(path, data: bytes):
    try:
        text = gzip.decompress(data).decode()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise EvidenceError(f"{Path(path).name} is not gzip text ({err})") from None
    lines = text.splitlines()
    if len(lines) < 2 or not lines[0].startswith(f"{MAGIC} {FORMAT} ") or lines[1] != COLUMNS:
        raise EvidenceError(f"{Path(path).name} does not start with the evidence header ({MAGIC} {FORMAT}, {COLUMNS})")
    try:
        header = json.loads(lines[0][len(f"{MAGIC} {FORMAT} "):])
    except ValueError:
        raise EvidenceError(f"{Path(path).name}: its header is not JSON") from None
    rows = []
    for number, line in enumerate(lines[2:], start=3):
        try:
            image, target, top5 = line.split(",")
            rows.append((image, int(target), tuple(int(c) for c in top5.split())))
        except ValueError:
            raise EvidenceError(f"{Path(path).name} line {number} is not image,target,top5: {line[:80]!r}") from None
    return header, rows


def metrics(rows) -> dict:
    """Top-1/top-5 in % of evidence rows (the formula of engine.evaluate)."""
    seen = len(rows)
    correct1 = sum(1 for _, target, top5 in rows if len(top5) and top5[0] == target)
    correct5 = sum(1 for _, target, top5 in rows if target in top5[:5])
    return {"top1": 100.0 * correct1 / max(seen, 1), "top5": 100.0 * correct5 / max(seen, 1), "images": seen}


def derive(folder, result: dict, record_key: str = "evidence", stated: dict | None = None):
    """(metrics, rows, None) recomputed from the evidence `result[record_key]` names in `folder`, or
    (None, None, reason). `stated`: {metric: value} result.json claims (default its top1/top5)."""
    record = result.get(record_key)
    if not isinstance(record, dict) or not record.get("file") or not record.get("sha256"):
        return None, None, f"it has no per-image evidence ({record_key}.file, {record_key}.sha256): evaluate it again"
    name = str(record["file"])
    if PurePosixPath(name).name != name or name in ("", ".", ".."):
        return None, None, f"its evidence {name!r} is not a file beside result.json"
    path = Path(folder) / name
    if not path.is_file():
        return None, None, f"its evidence {name} is missing beside result.json: evaluate it again"
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        return None, None, f"its evidence {name} changed since the run (sha256 differs): evaluate it again"
    try:
        header, rows = read(path, data)
    except EvidenceError as err:
        return None, None, f"its evidence is unreadable: {err}"
    if header.get("run_dir") != result.get("run_dir"):
        return None, None, (f"its evidence {name} was written for runs/{header.get('run_dir')}, not for "
                            f"runs/{result.get('run_dir')} (copied from another run)")
    checkpoint = (result.get("weights") or {}).get("sha256")
    if header.get("checkpoint_sha256") != checkpoint:
        return None, None, (f"its evidence {name} is of checkpoint sha256 {str(header.get('checkpoint_sha256'))[:12]}, "
                            f"result.json's is {str(checkpoint)[:12]} (copied from another checkpoint)")
    images = [image for image, _, _ in rows]
    if len(set(images)) != len(images):
        return None, None, f"its evidence {name} lists an image twice"
    data = result.get("data") or {}
    if files_sha256(images) != data.get("files_sha256"):
        return None, None, (f"its evidence's {len(images)} images are not the split's file list recorded in "
                            "result.json (data.files_sha256 differs)")
    folders = [class_of(image) for image in images]
    classes = class_order(folders)
    if list_sha256(classes) != data.get("classes_sha256"):
        return None, None, (f"the {len(classes)} classes its evidence's folders name are not the data root's class "
                            "list recorded in result.json (data.classes_sha256 differs)")
    index = {c: i for i, c in enumerate(classes)}
    wrong = [(row[0], row[1], index[folder]) for row, folder in zip(rows, folders) if index[folder] != row[1]]
    if wrong:
        image, target, named = wrong[0]
        return None, None, (f"its evidence's targets are not the classes their folders name ({len(wrong)} of "
                            f"{len(rows)}, e.g. {image} labelled {target}, its folder is class {named}): relabelled")
    found = {**metrics(rows), "classes": len(classes)}
    stated = {"top1": result.get("top1"), "top5": result.get("top5")} if stated is None else stated
    for metric, value in stated.items():
        computed = found[metric.removesuffix("_deploy")]
        if not isinstance(value, (int, float)) or isinstance(value, bool) or abs(value - computed) > TOLERANCE:
            return None, None, (f"its {metric} {value!r} disagrees with its evidence {name} ({computed:.4f} over "
                                f"{len(rows)} images)")
    return found, rows, None
