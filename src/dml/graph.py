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
    gate = "through"                  # through (default), cutoff, linear, correct, linear_ramp or sigmoid_ramp
    # detach = false                  # let the gradient flow into the source too (its own network's peers)
    # ramp_epochs = 80.0              # ramp gates: epochs until full weight (default: the whole run)
    # standardize = true              # z-score both logits per sample first (not on a self link)

    [[peer]]
    name = "student_mean"
    ema_of = "student"                # a temporal mean: the moving average of a trainable peer's weights
    decay = 0.999                     # default 0.999

    [[trunk]]                         # branches on a shared trunk: one network, each branch a peer
    model = "resnet32"                # a built-in CIFAR ResNet or wide ResNet (or a network that splits)
    branches = ["b1", "b2", "b3"]     # the branches' peer names (at least 2)
    shared = 2                        # stages the trunk holds (default 2: the stem and stages 1-2)
    trunk_gradient = "sum"            # sum (default) or mean: the trunk's gradient times 1/m (CL-ILR)
    teacher = "one"                   # a learned teacher made of the branches (optional): one (ONE's gate),
                                      # okddip (a target per auxiliary branch), ffl (FFL's fusion head) or
                                      # pcl (PCL's linear classifier on the concatenated pooled features)
    teacher_name = "gate"             # its peer name (default "teacher"; OKDDip's: gate1, gate2, ...)
    views = false                     # true: each branch (and its temporal mean) sees its own augmentation
                                      # of the batch, the trunk computed on each (PCL)

A link's source may also be "ensemble": the mean of the trainable peers' logits (KDCL), "others": the
mean of the trainable peers' logits but the target's (CL-ILR), or a list of peers: the mean of their
logits (source = ["b1", "b2", "b3"]). Every
trainable peer gets a self link (weight 1, through) unless the file gives one. A trunk's peers come
first in the cohort (its branches, then its teacher), in the order of the [[trunk]] tables, then the
[[peer]] tables; its branches all train (they are one network with one optimizer).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import cast, overload

from .branches import check_split, teacher_learns_from_labels, teacher_outputs
from .checkpoint import TEACHER, check_model_named, file_digest, read_checkpoint, teacher_path
from .errors import UserError
from .links import COMBINES, ENSEMBLE, GROUP_SOURCES, OTHERS, Link, Links
from .models import model_factory
from .peer import MeanOf, names_flag, one_or_each
from .tomlfile import read_toml

LABELS = "labels"
RESERVED = (LABELS, *GROUP_SOURCES)  # source names that are no peer
PEER_KEYS = {"name", "model", "checkpoint", "ema_of", "decay"}
TRUNK_KEYS = {"model", "branches", "shared", "trunk_gradient", "teacher", "teacher_name", "views"}
LINK_KEYS = {"source", "target", "temperature", "weight", "gate", "ramp_epochs", "standardize", "detach"}


def frozen_peer(path: str | Path, name: str, open_checkpoint: bool = True) -> dict:
    """A frozen peer from a checkpoint of an earlier run: its model name and a hash of the file.

    The model name is what the checkpoint records; the caller checks it against what the user named
    (``check_model_named``) before anything builds it. With ``open_checkpoint`` False the file is only
    checked to exist (model and sha256 None): enough to count the peers of a planned run."""
    if not open_checkpoint:
        return {"name": name, "model": None, "checkpoint": str(teacher_path(path).resolve()), "sha256": None}
    saved = read_checkpoint(path, TEACHER)
    return {
        "name": name,
        "model": saved.model_name,
        "checkpoint": str(saved.path.resolve()),
        "sha256": file_digest(saved.path),
    }


def teacher_spec(
    students: Sequence[str],
    teachers: Sequence[str],
    temperature: float,
    weight: float,
    teacher_models: Sequence[str] | None = None,
    open_checkpoints: bool = True,
    gate: str = "through",
    ramp_epochs: float | None = None,
) -> dict:
    """``--teacher``: the students learn from every teacher (and, two or more, from each other), with
    the given temperature, weight and gate. ``teacher_models`` (``--teacher-model``, one for all or one per
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
    links = Links.mutual(len(peers), temperature, weight, frozen_indices, gate, ramp_epochs)
    return {"peers": peers, **links.to_dict()}


def read_graph(path: str | Path, open_checkpoints: bool = True) -> dict:
    """The spec of a graph file; one UserError line per mistake, naming the file. With
    ``open_checkpoints`` False its checkpoints are only checked to exist (see ``frozen_peer``)."""
    path = Path(path)
    data = read_toml(path, "graph file")
    where = f"graph file {path}"
    unknown = set(data) - {"peer", "link", "combine", "trunk"}
    if unknown:
        raise UserError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; expected [[peer]], [[trunk]], [[link]], combine"
        )
    combine = data.get("combine", "mean")
    if combine not in COMBINES:
        raise UserError(f"{where}: combine {combine!r} is not one of: {', '.join(COMBINES)}")
    trunks: list[dict] = []
    peers: list[dict] = []
    for t, entry in enumerate(_tables(data, "trunk", where)):
        trunk, members = _trunk(entry, t, len(peers), where)
        trunks.append(trunk)
        peers += members
    peers += [
        _peer(entry, k, where, path.parent, open_checkpoints) for k, entry in enumerate(_tables(data, "peer", where))
    ]
    if not peers:
        raise UserError(f"{where} defines no [[peer]]")
    index = {}
    for k, peer in enumerate(peers):
        if peer["name"] in index or peer["name"] in RESERVED:
            raise UserError(f"{where}: peer name {peer['name']!r} is used twice or is reserved")
        index[peer["name"]] = k
    for peer in peers:
        if "ema_of" in peer:
            _resolve_mean(peer, peers, index, where)
    frozen = [k for k, p in enumerate(peers) if p["checkpoint"] is not None or "ema_of" in p]
    links = [_link(entry, index, frozen, where) for entry in _tables(data, "link", where)]
    given = {(link.source, link.target) for link in links}
    links += [
        Link(k, k, weight=0.0)
        for k, p in enumerate(peers)  # OKDDip's targets learn through their links only
        if p.get("learned_teacher") and not teacher_learns_from_labels(p["model"]) and (k, k) not in given
    ]
    try:
        graph = Links(links, len(peers), combine, frozen)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None
    for link in graph.undetached:  # read with their graph: computed in the same backward as the target
        read = [peers[k] for k in link.peers or graph.trainable]
        if "trunk" not in peers[link.target] or any(p.get("trunk") != peers[link.target]["trunk"] for p in read):
            raise UserError(
                f"{where}: a link into {peers[link.target]['name']!r} has detach = false: its source must "
                "be peers of the target's own [[trunk]]"
            )
    return {"peers": peers, **graph.to_dict(), **({"trunks": trunks} if trunks else {})}


def _trunk(entry: dict, t: int, first: int, where: str) -> tuple[dict, list[dict]]:
    """A [[trunk]] table: the network (model, split, teacher) and its peers, the branches then the teacher,
    numbered from ``first``; one UserError line per mistake."""
    label = f"trunk {t + 1}"
    unknown = set(entry) - TRUNK_KEYS
    if unknown:
        raise UserError(
            f"{where}: {label} has unknown key(s) {', '.join(sorted(unknown))}; "
            f"expected {', '.join(sorted(TRUNK_KEYS))}"
        )
    model, names = entry.get("model"), entry.get("branches")
    if not isinstance(model, str):
        raise UserError(f'{where}: {label} needs a model (the network its branches are), e.g. model = "resnet32"')
    if not isinstance(names, list) or len(names) < 2 or not all(isinstance(n, str) and n for n in names):
        raise UserError(
            f"{where}: {label}: branches lists the branches' peer names, at least 2, e.g. "
            'branches = ["b1", "b2", "b3"]'
        )
    try:
        network = model_factory(model)(2)
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: {label}: {exc}") from None
    teacher, teacher_name = entry.get("teacher"), entry.get("teacher_name", "teacher")
    shared, gradient = entry.get("shared", 2), entry.get("trunk_gradient", "sum")
    try:
        check_split(network, shared, teacher, gradient)
    except ValueError as exc:
        raise UserError(f"{where}: {label} ({model}): {exc}") from None
    if "teacher_name" in entry and teacher is None:
        raise UserError(f'{where}: {label}: teacher_name names a learned teacher; add teacher = "one"')
    if not isinstance(teacher_name, str) or not teacher_name:
        raise UserError(f"{where}: {label}: teacher_name must be a peer name, not {teacher_name!r}")
    if teacher == "okddip" and len(names) < 3:
        raise UserError(
            f"{where}: {label}: OKDDip needs at least 3 branches (2 or more auxiliary peers, then the leader)"
        )
    views = entry.get("views", False)
    if not isinstance(views, bool):
        raise UserError(f"{where}: {label}: views must be true or false, not {views!r}")
    trunk = {
        "model": model,
        "first": first,
        "branches": len(names),
        "shared": shared,
        "trunk_gradient": gradient,
        "teacher": teacher,
        **({"views": True} if views else {}),
    }
    members = [{"name": n, "model": model, "checkpoint": None, "sha256": None, "trunk": t} for n in names]
    outputs = teacher_outputs(teacher, len(names))
    members += [
        {
            "name": teacher_name if outputs == 1 else f"{teacher_name}{k + 1}",
            "model": teacher,
            "checkpoint": None,
            "sha256": None,
            "trunk": t,
            "learned_teacher": True,
        }
        for k in range(outputs)
    ]
    return trunk, members


def trunks_of(spec: dict | None) -> list[dict]:
    """The multi-branch networks of a stored spec: model, first peer, number of branches, split, teacher."""
    return list((spec or {}).get("trunks", []))


def homes_of(spec: dict | None) -> dict[int, int]:
    """Where a peer must live, where it is not free: a branch or learned teacher with its trunk's first
    branch, a temporal mean with its source (or its source's trunk)."""
    members = {}
    for trunk in trunks_of(spec):
        outputs = trunk["branches"] + teacher_outputs(trunk["teacher"], trunk["branches"])
        members.update({i: trunk["first"] for i in range(trunk["first"] + 1, trunk["first"] + outputs)})
    return {**members, **{i: members.get(m.source, m.source) for i, m in means_of(spec).items()}}


def means_of(spec: dict | None) -> dict[int, MeanOf]:
    """The temporal means of a stored spec: index -> what it follows."""
    peers = spec["peers"] if spec else []
    return {k: MeanOf(p["ema_of"], p["decay"]) for k, p in enumerate(peers) if "ema_of" in p}


def links_of(spec: dict) -> Links:
    """The Links of a stored spec (teachers and temporal means are frozen: no link leads into them)."""
    frozen = [k for k, p in enumerate(spec["peers"]) if p["checkpoint"] is not None or "ema_of" in p]
    return Links([Link(**link) for link in spec["links"]], len(spec["peers"]), spec["combine"], frozen)


def _tables(data: dict, key: str, where: str) -> list[dict]:
    entries = data.get(key, [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise UserError(f"{where}: {key} must be written as [[{key}]] tables")
    return entries


def _peer(entry: dict, k: int, where: str, base: Path, open_checkpoint: bool) -> dict:
    unknown = set(entry) - PEER_KEYS
    if unknown:
        raise UserError(
            f"{where}: peer {k + 1} has unknown key(s) {', '.join(sorted(unknown))}; "
            f"expected {', '.join(sorted(PEER_KEYS))}"
        )
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise UserError(f"{where}: peer {k + 1} needs a name")
    if "ema_of" in entry:
        if "model" in entry or "checkpoint" in entry:
            raise UserError(
                f"{where}: peer {name!r} is a temporal mean (ema_of): it has its source's model, and no "
                "model or checkpoint of its own"
            )
        return {
            "name": name,
            "model": None,
            "checkpoint": None,
            "sha256": None,
            "ema_of": entry["ema_of"],
            "decay": entry.get("decay", MeanOf(0).decay),
        }
    if "decay" in entry:
        raise UserError(f'{where}: peer {name!r}: decay belongs to a temporal mean; add ema_of = "<peer>"')
    if "model" not in entry and "checkpoint" not in entry:
        raise UserError(
            f"{where}: peer {name!r} needs a model (trainable), a checkpoint (frozen) or ema_of "
            "(a temporal mean of a trainable peer)"
        )
    if "checkpoint" in entry:
        path = Path(str(entry["checkpoint"])).expanduser()
        path = path if path.is_absolute() else base / path
        peer = frozen_peer(path, name, open_checkpoint)
        if not open_checkpoint:
            return peer
        # beside a checkpoint, model names the network it holds: needed to import a network of the user's own
        check_model_named(
            f"{where}: peer {name!r}: checkpoint {path}",
            peer["model"],
            entry.get("model"),
            f'model = "{peer["model"]}" in peer {name!r}',
        )
        return peer
    try:
        model_factory(entry["model"])
    except (ValueError, TypeError) as exc:
        raise UserError(f"{where}: peer {name!r}: {exc}") from None
    return {"name": name, "model": entry["model"], "checkpoint": None, "sha256": None}


def _resolve_mean(peer: dict, peers: list[dict], index: dict[str, int], where: str) -> None:
    """A temporal mean's source by index, its model the source's; one UserError line per mistake."""
    name, of = peer["name"], peer["ema_of"]
    if not isinstance(of, str) or of not in index:
        raise UserError(f"{where}: peer {name!r}: ema_of {of!r} is not a peer; the peers are {', '.join(index)}")
    source = peers[index[of]]
    if of == name or source["checkpoint"] is not None or "ema_of" in source:
        what = "itself" if of == name else "frozen" if source["checkpoint"] is not None else "a temporal mean"
        raise UserError(
            f"{where}: peer {name!r} is the mean of {of!r}, which is {what}; a temporal mean follows a peer that trains"
        )
    if source.get("learned_teacher"):
        raise UserError(
            f"{where}: peer {name!r} is the mean of {of!r}, a learned teacher of a [[trunk]]; a temporal "
            "mean follows a branch or a peer"
        )
    decay = _number(peer, "decay", MeanOf(0).decay, f"{where}: peer {name!r}")
    try:
        MeanOf(index[of], decay)
    except ValueError as exc:
        raise UserError(f"{where}: peer {name!r}: {exc}") from None
    peer.update(model=source["model"], ema_of=index[of], decay=decay)


def _link(entry: dict, index: dict[str, int], frozen: list[int], where: str) -> Link:
    unknown = set(entry) - LINK_KEYS
    if unknown:
        raise UserError(
            f"{where}: a link has unknown key(s) {', '.join(sorted(unknown))}; expected {', '.join(sorted(LINK_KEYS))}"
        )
    ends: dict[str, int | str | tuple[int, ...] | None] = {}
    for end in ("source", "target"):
        name = entry.get(end)
        if end == "source" and isinstance(name, list) and name:  # a group: the mean of those peers' logits
            strangers = [n for n in name if not isinstance(n, str) or n not in index]
            if strangers:
                raise UserError(
                    f"{where}: link {name!r} -> {entry.get('target')!r}: unknown source peer(s) "
                    f"{', '.join(map(repr, strangers))}; the peers are {', '.join(index)}"
                )
            ends[end] = tuple(index[n] for n in name)
            continue
        if not isinstance(name, str) or (name not in index and not (end == "source" and name in RESERVED)):
            raise UserError(
                f"{where}: link {entry.get('source')!r} -> {entry.get('target')!r}: unknown {end} "
                f"{name!r}; the peers are {', '.join(index)} (and {LABELS!r}, {ENSEMBLE!r}, "
                f"{OTHERS!r} or a list of peers as a source)"
            )
        ends[end] = name if name in GROUP_SOURCES else index.get(name)
    source, target = ends["source"], cast(int, ends["target"])  # a peer's index: no peer has a reserved name
    label = f"link {entry['source']} -> {entry['target']}"
    detach = entry.get("detach", True)
    if not isinstance(detach, bool):
        raise UserError(f"{where}: {label}: detach must be true or false, not {detach!r}")
    if target in frozen:
        what = (
            "joins two frozen peers (a cycle of frozen peers never learns)"
            if source in frozen
            else "leads into a frozen peer (a teacher or a temporal mean), which learns nothing from links"
        )
        raise UserError(f"{where}: {label} {what}; frozen peers can only be sources")
    standardize = entry.get("standardize", False)
    if not isinstance(standardize, bool):
        raise UserError(f"{where}: {label}: standardize must be true or false, not {standardize!r}")
    temperature = _number(entry, "temperature", 1.0, f"{where}: {label}")
    weight = _number(entry, "weight", 1.0, f"{where}: {label}")
    ramp_epochs = _number(entry, "ramp_epochs", None, f"{where}: {label}")
    try:
        return Link(
            target if source is None else source,
            target,
            temperature,
            weight,
            entry.get("gate", "through"),
            ramp_epochs,
            standardize,
            detach,
        )
    except (TypeError, ValueError) as exc:
        raise UserError(f"{where}: {label}: {exc}") from None


@overload
def _number(entry: dict, key: str, default: float, where: str) -> float: ...


@overload
def _number(entry: dict, key: str, default: None, where: str) -> float | None: ...


def _number(entry: dict, key: str, default: float | None, where: str) -> float | None:
    """``entry[key]`` as a float: every number a graph file gives is a TOML number (``80`` or ``0.99``, not
    ``"80"``, not ``true``)."""
    value = entry.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{where}: {key} must be a number, not {value!r}")
    return float(value)
