"""Knowledge-transfer graphs as users write them: a TOML file, or ``--teacher`` for distillation.

Both become a *graph spec*, plain data that config.json stores and ``--resume`` compares::

    {"peers": [{"name": "student", "model": "resnet32", "checkpoint": null, "sha256": null},
               {"name": "teacher", "model": "wrn28_2", "checkpoint": "/abs/best.pt", "sha256": "..."}],
     "links": [{"source": 1, "target": 0, "temperature": 2.0, "weight": 1.0, "gate": "through"}, ...],
     "combine": "mean"}

A graph file::

    combine = "mean"                  # how the links from other peers add up: mean (default) or sum

    [[peer]]
    name = "student"
    model = "resnet32"                # trainable: a built-in name or package.module:factory

    [[peer]]
    name = "teacher"
    checkpoint = "runs/independent_wrn28_2_s42/0_wrn28_2/best.pt"   # frozen; its model from the file
    # model = "mynets:small_cnn"      # with a checkpoint: the network it holds, needed where it is
                                      # package.module:factory (a checkpoint never imports code by itself)

    [[link]]
    source = "teacher"                # a peer's name; "labels" is the self link (cross-entropy)
    target = "student"
    temperature = 2.0                 # default 1
    weight = 1.0                      # default 1
    gate = "through"                  # through (default), cutoff, linear or correct

Every trainable peer gets a self link (weight 1, through) unless the file gives one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .errors import UserError
from .links import COMBINES, Link, Links
from .models import model_factory
from .checkpoint import TEACHER, check_model_named, file_digest, read_checkpoint, teacher_path
from .peer import names_flag, one_or_each
from .tomlfile import read_toml

LABELS = "labels"
PEER_KEYS = {"name", "model", "checkpoint"}
LINK_KEYS = {"source", "target", "temperature", "weight", "gate"}


def frozen_peer(path: str | Path, name: str, open_checkpoint: bool = True) -> dict:
    """A frozen peer from a checkpoint of an earlier run: its model name and a hash of the file.

    The model name is what the checkpoint records; the caller checks it against what the user named
    (``check_model_named``) before anything builds it. With ``open_checkpoint`` False the file is only
    checked to exist (model and sha256 None): enough to count the peers of a planned run."""
    if not open_checkpoint:
        return {"name": name, "model": None, "checkpoint": str(teacher_path(path).resolve()), "sha256": None}
    saved = read_checkpoint(path, TEACHER)
    return {"name": name, "model": saved.model_name, "checkpoint": str(saved.path.resolve()),
            "sha256": file_digest(saved.path)}


def teacher_spec(students: Sequence[str], teachers: Sequence[str], temperature: float, weight: float,
                 teacher_models: Sequence[str] | None = None, open_checkpoints: bool = True) -> dict:
    """``--teacher``: the students learn from every teacher (and, two or more, from each other), with
    the given temperature and weight. ``teacher_models`` (``--teacher-model``, one for all or one per
    teacher) names the teachers' networks; a network of the user's own must be named to be imported.
    With ``open_checkpoints`` False the teachers are only checked to exist (see ``frozen_peer``)."""
    named = one_or_each("--teacher-model", teacher_models, len(teachers), "--teacher checkpoint")
    frozen = [frozen_peer(path, f"teacher{k}", open_checkpoints) for k, path in enumerate(teachers)]
    if open_checkpoints:
        flag = names_flag("--teacher-model", [peer["model"] for peer in frozen])
        for path, peer, given in zip(teachers, frozen, named):
            check_model_named(f"teacher checkpoint {path}", peer["model"], given, flag)
    peers = [{"name": f"{i}_{m}", "model": m, "checkpoint": None, "sha256": None} for i, m in enumerate(students)]
    peers += frozen
    frozen_indices = list(range(len(students), len(peers)))
    links = Links.mutual(len(peers), temperature, weight, frozen=frozen_indices)
    return {"peers": peers, **links.to_dict()}


def read_graph(path: str | Path, open_checkpoints: bool = True) -> dict:
    """The spec of a graph file; one UserError line per mistake, naming the file. With
    ``open_checkpoints`` False its checkpoints are only checked to exist (see ``frozen_peer``)."""
    path = Path(path)
    data = read_toml(path, "graph file")
    where = f"graph file {path}"
    unknown = set(data) - {"peer", "link", "combine"}
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected [[peer]], [[link]], combine")
    combine = data.get("combine", "mean")
    if combine not in COMBINES:
        raise UserError(f"{where}: combine {combine!r} is not one of: {', '.join(COMBINES)}")
    peers = [_peer(entry, k, where, path.parent, open_checkpoints) for k, entry in enumerate(_tables(data, "peer", where))]
    if not peers:
        raise UserError(f"{where} defines no [[peer]]")
    index = {}
    for k, peer in enumerate(peers):
        if peer["name"] in index or peer["name"] == LABELS:
            raise UserError(f"{where}: peer name {peer['name']!r} is used twice or is reserved")
        index[peer["name"]] = k
    frozen = [k for k, p in enumerate(peers) if p["checkpoint"] is not None]
    links = [_link(entry, index, frozen, where) for entry in _tables(data, "link", where)]
    try:
        graph = Links(links, len(peers), combine, frozen)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None
    return {"peers": peers, **graph.to_dict()}


def links_of(spec: dict) -> Links:
    """The Links of a stored spec."""
    frozen = [k for k, p in enumerate(spec["peers"]) if p["checkpoint"] is not None]
    return Links([Link(**link) for link in spec["links"]], len(spec["peers"]), spec["combine"], frozen)


def _tables(data: dict, key: str, where: str) -> list[dict]:
    entries = data.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"{where}: {key} must be written as [[{key}]] tables")
    return entries


def _peer(entry: dict, k: int, where: str, base: Path, open_checkpoint: bool) -> dict:
    unknown = set(entry) - PEER_KEYS
    if unknown:
        raise UserError(f"{where}: peer {k + 1} has unknown key(s) {', '.join(sorted(unknown))}; "
                        f"expected {', '.join(sorted(PEER_KEYS))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: peer {k + 1} needs a name")
    if "model" not in entry and "checkpoint" not in entry:
        raise UserError(f"{where}: peer {name!r} needs a model (trainable) or a checkpoint (frozen)")
    if "checkpoint" in entry:
        path = Path(str(entry["checkpoint"])).expanduser()
        path = path if path.is_absolute() else base / path
        peer = frozen_peer(path, name, open_checkpoint)
        if not open_checkpoint:
            return peer
        # beside a checkpoint, model names the network it holds: needed to import a network of the user's own
        check_model_named(f"{where}: peer {name!r}: checkpoint {path}", peer["model"], entry.get("model"),
                          f'model = "{peer["model"]}" in peer {name!r}')
        return peer
    try:
        model_factory(entry["model"])
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: peer {name!r}: {exc}") from None
    return {"name": name, "model": entry["model"], "checkpoint": None, "sha256": None}


def _link(entry: dict, index: dict[str, int], frozen: list[int], where: str) -> Link:
    unknown = set(entry) - LINK_KEYS
    if unknown:
        raise UserError(f"{where}: a link has unknown key(s) {', '.join(sorted(unknown))}; "
                        f"expected {', '.join(sorted(LINK_KEYS))}")
    ends = {}
    for end in ("source", "target"):
        name = entry.get(end)
        if name not in index and not (end == "source" and name == LABELS):
            raise UserError(f"{where}: link {entry.get('source')!r} -> {entry.get('target')!r}: unknown {end} "
                            f"{name!r}; the peers are {', '.join(index)} (and {LABELS!r} as a source)")
        ends[end] = index.get(name)
    source, target = ends["source"], ends["target"]
    label = f"link {entry['source']} -> {entry['target']}"
    if target in frozen:
        what = "joins two frozen peers (a cycle of frozen peers never learns)" if source in frozen else \
            "leads into a frozen peer, which learns nothing"
        raise UserError(f"{where}: {label} {what}; frozen peers can only be sources")
    try:
        return Link(target if source is None else source, target, float(entry.get("temperature", 1.0)),
                    float(entry.get("weight", 1.0)), entry.get("gate", "through"))
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: {label}: {exc}") from None
