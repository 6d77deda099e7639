"""Convert between ComfyUI's API-format prompts and UI-format (drag-and-drop) workflows.

The UI files in ``example_workflows/`` (where ComfyUI's template browser finds them, each with a same-name ``.jpg``
thumbnail) are generated from their API twins in ``example_workflows/api/`` with this tool, and the real-host tests
convert every UI file back (the way the frontend's graphToPrompt does) and compare it with its twin, so the two never
drift apart.

Both directions need ComfyUI's node definitions (``/object_info``), so run it inside a booted ComfyUI process:

    COMFYUI_PATH=/path/to/ComfyUI python -m tools.workflow_format --regenerate [--peers DIR]

The ``interop_*`` workflows use nodes of VideoHelperSuite, AnimateDiff-Evolved and IPAdapter_plus: ``--peers DIR``
(a folder holding those three packs) boots ComfyUI with them too (tools/comfy_host.py); without it those
workflows are skipped with a note.

Dynamic dropdowns (ComfyUI 0.33's ``COMFY_DYNAMICCOMBO_V3``, e.g. core Save Video's ``format`` with its nested
``codec``): the chosen option's own inputs follow the dropdown's value in ``widgets_values`` and are queued under
dotted names (``format.codec``). :func:`dynamic_form` writes a prompt of the older layout (``format`` + a top-level
``codec``, what 0.3.x queues and 0.33 still accepts) the way the 0.33 frontend queues it, so both can be compared.

Two frontend conventions of other packs are followed: VideoHelperSuite's nodes (``VHS_*``) save their widgets as a
name -> value object instead of a list, and a combo whose ``formats`` option maps the chosen value to a list of
``[name, type, options]`` (VHS Video Combine's ``format``) adds those widgets to the node, and to the prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
#: a dropdown whose chosen option brings inputs of its own (ComfyUI >= 0.33)
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
REPO = Path(__file__).resolve().parents[1]
#: node types whose frontend extension stores widgets_values as {widget name: value} (VideoHelperSuite's)
KV_WIDGET_PREFIXES = ("VHS_",)


def keyed_widgets(class_type: str) -> bool:
    return class_type.startswith(KV_WIDGET_PREFIXES)


def node_info(nodes_module, class_type: str) -> dict:
    """The /object_info entry of one node class (V1 or V3)."""
    cls = nodes_module.NODE_CLASS_MAPPINGS[class_type]
    if hasattr(cls, "GET_NODE_INFO_V1"):
        return cls.GET_NODE_INFO_V1()
    inputs = cls.INPUT_TYPES()
    return {"input": inputs, "input_order": {k: list(v.keys()) for k, v in inputs.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)}


def _inputs_in_order(info: dict):
    """(name, type, options) for required then optional inputs, in declaration order."""
    for section in ("required", "optional"):
        spec = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(spec)):
            entry = spec[name]
            if isinstance(entry[0], str) and entry[0] == DYNAMIC_COMBO:
                opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
                if not opts.get("hidden"):  # a hidden one only takes prompts of the older layout
                    yield name, DYNAMIC_COMBO, opts
                continue
            typ = entry[0]
            opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
            if isinstance(typ, (list, tuple)):
                typ = "COMBO"
            yield name, typ, opts


def _extra_widget_values(name: str, typ: str, opts: dict) -> int:
    """Widgets the frontend adds after an input: seed controls and image-upload buttons."""
    if typ == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
        return 1
    if typ == "COMBO" and (opts.get("image_upload") or opts.get("video_upload")):
        return 1
    return 0


def dynamic_children(opts: dict, value) -> list[tuple[str, str, dict]]:
    """(name, type, options) of the inputs that a dynamic dropdown's chosen ``value`` brings, in order."""
    option = next((o for o in opts.get("options", []) if isinstance(o, dict) and o.get("key") == value), None)
    if option is None:
        return []
    return list(_inputs_in_order({"input": option.get("inputs", {})}))


def dynamic_form(prompt: dict, nodes_module) -> dict:
    """``prompt`` with each dynamic dropdown's nested inputs under their dotted names (``format.codec``), as the
    frontend of a host with dynamic dropdowns queues it: an input given at the top level in the older layout
    (``codec``) moves under its dropdown. Nodes without dynamic dropdowns are unchanged."""
    out = json.loads(json.dumps(prompt))

    def move(inputs, name, opts, prefix):
        for child, typ, child_opts in dynamic_children(opts, inputs.get(prefix + name)):
            dotted = f"{prefix}{name}.{child}"
            if dotted not in inputs and child in inputs:
                inputs[dotted] = inputs.pop(child)
            if typ == DYNAMIC_COMBO:
                move(inputs, child, child_opts, f"{prefix}{name}.")

    for node in out.values():
        if node["class_type"] not in nodes_module.NODE_CLASS_MAPPINGS:
            continue
        for name, typ, opts in _inputs_in_order(node_info(nodes_module, node["class_type"])):
            if typ == DYNAMIC_COMBO and name in node["inputs"]:
                move(node["inputs"], name, opts, "")
    return out


def format_widgets(opts: dict, value) -> list:
    """The widgets ([name, type, options]) a ``formats`` combo adds for its chosen ``value`` (VHS Video Combine)."""
    extra = (opts.get("formats") or {}).get(value) if isinstance(value, str) else None
    return [w for w in extra if isinstance(w, (list, tuple)) and w and isinstance(w[0], str)] \
        if isinstance(extra, (list, tuple)) else []


def _keyed_inputs(info: dict, linked: dict, links: dict, values: dict) -> dict:
    """API inputs of a node whose widgets_values is a {name: value} object."""
    inputs = {}
    for name, typ, opts in _inputs_in_order(info):
        if name in linked:
            link = links[linked[name]]
            inputs[name] = [str(link[1]), link[2]]
        elif typ in WIDGET_TYPES and name in values:
            inputs[name] = values[name]
            for extra in format_widgets(opts, values[name]):
                if extra[0] in values:
                    inputs[extra[0]] = values[extra[0]]
    return inputs


def ui_to_api(ui: dict, nodes_module) -> dict:
    """The API prompt the frontend would queue for a UI-format workflow."""
    links = {link[0]: link for link in ui["links"]}
    prompt = {}
    for node in ui["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = node_info(nodes_module, node["type"])
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        if isinstance(node.get("widgets_values"), dict):
            inputs = _keyed_inputs(info, linked, links, node["widgets_values"])
            prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
            continue
        values = list(node.get("widgets_values", []))
        inputs = {}
        _positional_inputs(list(_inputs_in_order(info)), values, inputs, linked, links, "")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def _positional_inputs(specs, values: list, inputs: dict, linked: dict, links: dict, prefix: str) -> None:
    """Fill ``inputs`` from a node's positional ``widgets_values`` (consumed from ``values``); a dynamic dropdown's
    chosen option brings its own widgets right after it, queued as ``dropdown.child``."""
    for name, typ, opts in specs:
        key = prefix + name
        if key in linked:
            link = links[linked[key]]
            inputs[key] = [str(link[1]), link[2]]
            if typ in WIDGET_TYPES:  # a widget converted to an input still holds its value slot
                del values[:1 + _extra_widget_values(name, typ, opts)]
            continue
        if (typ not in WIDGET_TYPES and typ != DYNAMIC_COMBO) or not values:
            continue
        inputs[key] = values.pop(0)
        if typ == DYNAMIC_COMBO:
            _positional_inputs(dynamic_children(opts, inputs[key]), values, inputs, linked, links, key + ".")
            continue
        del values[:_extra_widget_values(name, typ, opts)]


def api_to_ui(prompt: dict, nodes_module) -> dict:
    """A UI-format workflow (nodes laid out left to right by depth) for an API prompt."""
    ids = list(prompt)
    depth: dict[str, int] = {}

    def d(nid):
        if nid not in depth:
            ups = [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((d(u) for u in ups), default=-1)
        return depth[nid]

    for nid in ids:
        d(nid)
    rows: dict[int, int] = {}
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    infos = {nid: node_info(nodes_module, prompt[nid]["class_type"]) for nid in ids}
    for nid in ids:
        for name, value in prompt[nid]["inputs"].items():
            if isinstance(value, list):
                link_id = len(links) + 1
                src, slot = value
                typ = infos[src]["output"][slot]
                links.append([link_id, int(src), slot, int(nid), None, typ])
                out_links.setdefault((src, slot), []).append(link_id)
    link_iter = {l[0]: l for l in links}
    for order, nid in enumerate(sorted(ids, key=lambda n: (depth[n], int(n)))):
        info, node = infos[nid], prompt[nid]
        col = depth[nid]
        row = rows.get(col, 0)
        rows[col] = row + 1
        inputs, widgets, keyed = [], [], {}
        for name, typ, opts in _inputs_in_order(info):
            value = node["inputs"].get(name)
            if isinstance(value, list):
                link_id = next(l[0] for l in links if l[3] == int(nid) and l[1] == int(value[0])
                               and l[2] == value[1] and l[4] is None)
                link_iter[link_id][4] = len(inputs)
                entry = {"name": name, "type": typ, "link": link_id}
                if typ in WIDGET_TYPES:
                    entry["widget"] = {"name": name}
                    widgets.append(opts.get("default"))
                    widgets.extend(["fixed"] * _extra_widget_values(name, typ, opts))
                    keyed[name] = opts.get("default")
                inputs.append(entry)
            elif typ == DYNAMIC_COMBO and name in node["inputs"]:
                widgets.extend(_dynamic_widget_values(node["inputs"], name, opts, ""))
                keyed[name] = value
            elif typ in WIDGET_TYPES and name in node["inputs"]:
                widgets.append(value)
                keyed[name] = value
                for extra in format_widgets(opts, value):
                    if extra[0] in node["inputs"]:
                        keyed[extra[0]] = node["inputs"][extra[0]]
                extra = _extra_widget_values(name, typ, opts)
                if extra:
                    widgets.append("fixed" if typ == "INT" else "image")
        if keyed_widgets(node["class_type"]):
            widgets = keyed
        outputs = [{"name": n, "type": t, "links": out_links.get((nid, i), []), "slot_index": i}
                   for i, (t, n) in enumerate(zip(info["output"], info["output_name"]))]
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [60 + 360 * col, 60 + 260 * row],
                      "size": [320, 200], "flags": {}, "order": order, "mode": 0, "inputs": inputs,
                      "outputs": outputs, "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets})
    return {"last_node_id": max(int(n) for n in ids), "last_link_id": len(links), "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}},
            "version": 0.4}


def _dynamic_widget_values(inputs: dict, name: str, opts: dict, prefix: str) -> list:
    """A dynamic dropdown's value followed by its chosen option's widget values (dotted names first, then the older
    top-level layout)."""
    value = inputs[prefix + name]
    out = [value]
    for child, typ, child_opts in dynamic_children(opts, value):
        dotted = f"{prefix}{name}.{child}"
        source = dotted if dotted in inputs else child
        if source not in inputs:
            continue
        if typ == DYNAMIC_COMBO:
            nested = {**inputs, dotted: inputs[source]}
            out.extend(_dynamic_widget_values(nested, child, child_opts, f"{prefix}{name}."))
        elif typ in WIDGET_TYPES:
            out.append(inputs[source])
    return out


THUMB_SIZE = (640, 400)
NODE_COLOURS = {"STD": (74, 108, 170), "SiD": (122, 86, 160)}


def thumbnail(ui: dict, nodes_module, size: tuple[int, int] = THUMB_SIZE):
    """A schematic picture of a UI workflow for the template browser: every node as a box with its display name
    at its canvas position (the pack's own nodes highlighted), every link as a line from output to input."""
    from PIL import Image, ImageDraw, ImageFont

    nodes = ui["nodes"]
    x0 = min(n["pos"][0] for n in nodes)
    y0 = min(n["pos"][1] for n in nodes)
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes)
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes)
    pad = 16
    scale = min((size[0] - 2 * pad) / (x1 - x0), (size[1] - 2 * pad) / (y1 - y0))

    def box(n):
        x, y = (n["pos"][0] - x0) * scale + pad, (n["pos"][1] - y0) * scale + pad
        return x, y, x + n["size"][0] * scale, y + n["size"][1] * scale * 0.6

    image = Image.new("RGB", size, (32, 32, 32))
    draw = ImageDraw.Draw(image)
    by_id = {n["id"]: n for n in nodes}
    for _, src, _, dst, _, _ in ui["links"]:  # cubic curves from the source's right edge to the target's left edge
        a, b = box(by_id[src]), box(by_id[dst])
        p0, p3 = (a[2], (a[1] + a[3]) / 2), (b[0], (b[1] + b[3]) / 2)
        bend = max(20.0, abs(p3[0] - p0[0]) / 2)
        p1, p2 = (p0[0] + bend, p0[1]), (p3[0] - bend, p3[1])
        pts = [tuple(((1 - t) ** 3) * q0 + 3 * ((1 - t) ** 2) * t * q1 + 3 * (1 - t) * t * t * q2 + t ** 3 * q3
                     for q0, q1, q2, q3 in zip(p0, p1, p2, p3)) for t in (i / 24 for i in range(25))]
        draw.line(pts, fill=(140, 140, 140), width=2)
    for n in nodes:
        cls = nodes_module.NODE_CLASS_MAPPINGS[n["type"]]
        name = nodes_module.NODE_DISPLAY_NAME_MAPPINGS.get(n["type"], n["type"])
        name = "".join(ch for ch in name if ord(ch) < 0x2000).strip()  # no emoji glyphs in the default font
        category = str(getattr(cls, "CATEGORY", "") or "")
        colour = next((c for key, c in NODE_COLOURS.items() if category.startswith(key)), (70, 70, 70))
        x, y, xe, ye = box(n)
        draw.rounded_rectangle([x, y, xe, ye], radius=6, fill=(53, 53, 53), outline=colour, width=3)
        draw.rounded_rectangle([x, y, xe, y + (ye - y) * 0.3], radius=6, fill=colour)
        size_pt = 15
        font = ImageFont.load_default(size=size_pt)
        while size_pt > 7 and draw.textlength(name, font=font) > (xe - x) - 10:
            size_pt -= 1
            font = ImageFont.load_default(size=size_pt)
        draw.text((x + 5, y + 2), name, fill=(235, 235, 235), font=font)
    return image


def regenerate(nodes_module, api_dir: Path = REPO / "example_workflows" / "api",
               ui_dir: Path = REPO / "example_workflows") -> list[str]:
    """Write every UI twin and thumbnail; returns the API files skipped because their nodes are not loaded."""
    skipped = []
    for api_file in sorted(api_dir.glob("*.json")):
        prompt = json.loads(api_file.read_text())
        missing = sorted({n["class_type"] for n in prompt.values()} - set(nodes_module.NODE_CLASS_MAPPINGS))
        if missing:
            skipped.append(api_file.name)
            print(f"skipped {api_file.name}: nodes not loaded: {', '.join(missing)} (boot with --peers DIR)")
            continue
        ui = api_to_ui(prompt, nodes_module)
        (ui_dir / api_file.name).write_text(json.dumps(ui, indent=1) + "\n")
        thumbnail(ui, nodes_module).save(ui_dir / f"{api_file.stem}.jpg", quality=88)
        print(f"wrote {ui_dir / api_file.name} and its thumbnail")
    return skipped


def main(argv=None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m tools.workflow_format", description=__doc__.split("\n\n")[0])
    parser.add_argument("--regenerate", action="store_true", help="write every UI twin and thumbnail from its API file")
    parser.add_argument("--peers", type=Path, metavar="DIR",
                        help="folder with ComfyUI-VideoHelperSuite, ComfyUI-AnimateDiff-Evolved and "
                             "ComfyUI_IPAdapter_plus: boot with them to convert the interop_* workflows too")
    args = parser.parse_args(argv)
    if not args.regenerate:
        parser.error("nothing to do: pass --regenerate")
    from tools import comfy_host

    if args.peers is not None:
        if not args.peers.is_dir():
            parser.error(f"--peers: '{args.peers}' is not a folder")
        missing = comfy_host.missing_peers(args.peers)
        if missing:
            parser.error(f"--peers: '{args.peers}' lacks {', '.join(missing)}")
    if not comfy_host.comfyui_path():
        parser.error("set COMFYUI_PATH to a ComfyUI checkout (the node definitions come from it)")
    base = Path(tempfile.mkdtemp(prefix="workflow_format_"))
    host = comfy_host.boot_with_peers(base, args.peers) if args.peers is not None else comfy_host.boot(base)
    regenerate(host.nodes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
