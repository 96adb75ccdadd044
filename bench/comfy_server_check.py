"""Run textenc's node pack inside a real ComfyUI server and compare with ComfyUI's own nodes.

Usage (in ComfyUI's own Python environment, with transformers; textenc need not be installed
there, it is put on the server's PYTHONPATH)::

    python bench/comfy_server_check.py --comfyui /path/to/ComfyUI [--port 8199] [--keep]

What it does, all inside ``--comfyui`` (a copy of ComfyUI made for this check: its text-encoder
config files are changed, see below, and restored at the end unless ``--keep``):

1. Tiny random text encoders in the released key layouts (transformers' CLIPTextModelWithProjection
   and T5EncoderModel): ``clip_l_tiny`` (12 layers, width 64), ``clip_g_tiny`` (32 layers, width 64)
   and ``t5xxl_tiny`` (24 blocks, d_model 4096, d_ff 16, 2 heads of 8), written to
   ``models/text_encoders``. ComfyUI builds its encoders from fixed JSON configs and tells the files
   apart by keys and shapes (``detect_te_model``: ``layers.30`` for CLIP-G, ``block.23`` with a
   4096-wide ``wi_1`` for T5-XXL) and pads SD3's CLIP features to 4096, so the tiny models keep
   those depths and T5's width while everything else is small; ComfyUI's three configs
   (``sd1_clip_config.json``, ``clip_config_bigg.json``, ``text_encoders/t5_config_xxl.json``) are
   rewritten to the tiny shapes. No ComfyUI code is changed.
2. ``custom_nodes/textenc_nodes`` links to this checkout's ``nodes/``; a small output node of this
   script (``custom_nodes/textenc_oracle_save.py``) saves a CONDITIONING to a safetensors file.
3. ``main.py --cpu --fp32-text-enc`` is started, and graphs are queued through its HTTP API
   (``POST /prompt``, ``GET /history``): a Flux-style and an SD3-style graph, each three ways:
   textenc's loader and encoder, ComfyUI's loader and encoder, and textenc's loader with
   ComfyUI's encoder (cross-wired); plus FluxGuidance both ways round.
4. The saved conditionings are compared (cond and pooled within 1e-5 relative, guidance equal).
5. The node-pack points of issue 28 (``bench/comfy_server_pack.py``): the pack's checkpoint
   loader on a tiny SD1 checkpoint in ``models/checkpoints``, ComfyUI's CLIP refused by textenc's
   encode nodes (naming the textenc loaders), and no built-in node renamed (a first server
   started with ``--disable-all-custom-nodes`` gives the stock names).

Exit status 0 when everything ran and matched; the table is printed either way.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import comfy_server_pack as pack

ROOT = Path(__file__).resolve().parents[1]
WIDTH = 64
CONFIGS = {
    "comfy/sd1_clip_config.json": dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=1,
                                       num_hidden_layers=12, projection_dim=WIDTH),
    "comfy/clip_config_bigg.json": dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=1,
                                        num_hidden_layers=32, projection_dim=WIDTH),
    "comfy/text_encoders/t5_config_xxl.json": dict(d_model=4096, d_ff=16, d_kv=8, num_heads=2, num_layers=24),
}
FILES = {"l": "clip_l_tiny.safetensors", "g": "clip_g_tiny.safetensors", "t5": "t5xxl_tiny.safetensors"}
SAVE_NODE = '''
import os, torch
from safetensors.torch import save_file

class OracleSaveConditioning:
    OUT = os.environ["TEXTENC_ORACLE_OUT"]
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "name": ("STRING", {"default": "x"})}}
    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = "testing"
    def save(self, conditioning, name):
        cond, extras = conditioning[0]
        out = {"cond": cond.float().contiguous()}
        if extras.get("pooled_output") is not None:
            out["pooled"] = extras["pooled_output"].float().contiguous()
        if extras.get("guidance") is not None:
            out["guidance"] = torch.tensor([float(extras["guidance"])])
        save_file(out, os.path.join(self.OUT, name + ".safetensors"),
                  metadata={"entries": str(len(conditioning)), "keys": ",".join(sorted(extras))})
        return {}

NODE_CLASS_MAPPINGS = {"OracleSaveConditioning": OracleSaveConditioning}
'''


# --- set-up ---------------------------------------------------------------------------

def tiny_configs(comfy: Path) -> dict[str, str]:
    """Rewrite ComfyUI's three text-encoder configs to the tiny shapes; returns the originals."""
    originals = {}
    for relative, changes in CONFIGS.items():
        path = comfy / relative
        originals[relative] = path.read_text()
        path.write_text(json.dumps({**json.loads(originals[relative]), **changes}, indent=2))
    return originals


def _randomize(model, seed: int) -> None:
    import torch
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and ("norm" in name or "layer_norm" in name):
                parameter.copy_(1.0 + 0.1 * torch.randn(parameter.shape, generator=generator))
            elif "shared" in name or "embed" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * (0.5 if "position" in name else 1.0))
            else:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) / parameter.shape[-1] ** 0.5)


def write_models(folder: Path) -> None:
    """The tiny encoders in the released layouts (HF keys; T5 without the tied embedding copy)."""
    import transformers
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    for role, layers, act, seed in (("l", 12, "quick_gelu", 1), ("g", 32, "gelu", 2)):
        config = transformers.CLIPTextConfig(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_attention_heads=1,
                                             num_hidden_layers=layers, projection_dim=WIDTH, hidden_act=act,
                                             vocab_size=49408, max_position_embeddings=77, eos_token_id=49407)
        model = transformers.CLIPTextModelWithProjection(config)
        _randomize(model, seed)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / FILES[role]))
    config = transformers.T5Config(vocab_size=32128, d_model=4096, d_ff=16, d_kv=8, num_heads=2, num_layers=24,
                                   feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    model = transformers.T5EncoderModel(config)
    _randomize(model, 3)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"},
              str(folder / FILES["t5"]))


def install_nodes(comfy: Path) -> None:
    link = comfy / "custom_nodes" / "textenc_nodes"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(ROOT / "nodes", target_is_directory=True)
    (comfy / "custom_nodes" / "textenc_oracle_save.py").write_text(SAVE_NODE)


# --- the server -------------------------------------------------------------------------

def start_server(comfy: Path, port: int, out: Path, log: Path, extra_paths: list[str],
                 extra_args: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *extra_paths]), "TEXTENC_ORACLE_OUT": str(out)}
    command = [sys.executable, "main.py", "--cpu", "--fp32-text-enc", "--listen", "127.0.0.1", "--port", str(port),
               "--disable-auto-launch", *extra_args]
    process = subprocess.Popen(command, cwd=comfy, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"ComfyUI exited with {process.returncode}; see {log}")
        try:
            get(port, "/system_stats")
            return process
        except OSError:
            time.sleep(1)
    raise SystemExit(f"ComfyUI did not answer in 600 s; see {log}")


def get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())


def queue(port: int, graph: dict) -> dict:
    data = json.dumps({"prompt": graph}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/prompt", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            prompt_id = json.loads(response.read())["prompt_id"]
    except urllib.error.HTTPError as error:
        raise SystemExit(f"ComfyUI refused the graph: {error.read().decode()[:2000]}") from None
    for _ in range(1800):
        history = get(port, f"/history/{prompt_id}")
        if prompt_id in history:
            return history[prompt_id]["status"]
        time.sleep(1)
    raise SystemExit("the graph did not finish in 30 minutes")


# --- graphs -----------------------------------------------------------------------------

PROMPT_L, PROMPT_G, PROMPT_T5 = "a photo of a (red:1.2) fox", "a fox in the snow", "a (detailed:1.3) photo of a fox"


def flux_graph() -> dict:
    texts = {"clip_l": PROMPT_L, "t5xxl": PROMPT_T5, "guidance": 3.5}
    files = {"clip_name1": FILES["l"], "clip_name2": FILES["t5"], "type": "flux"}
    return {
        "1": {"class_type": "TextencDualCLIPLoader", "inputs": {**files, "device": "cpu"}},
        "2": {"class_type": "TextencCLIPTextEncodeFlux", "inputs": {"clip": ["1", 0], **texts}},
        "3": {"class_type": "DualCLIPLoader", "inputs": {**files, "device": "cpu"}},
        "4": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["3", 0], **texts}},
        "5": {"class_type": "CLIPTextEncodeFlux", "inputs": {"clip": ["1", 0], **texts}},
        "6": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": 5.0}},
        "7": {"class_type": "TextencFluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 5.0}},
        **_saves({"flux_textenc": "2", "flux_comfy": "4", "flux_cross": "5", "flux_textenc_comfy_guidance": "6",
                  "flux_comfy_textenc_guidance": "7"}),
    }


def sd3_graph() -> dict:
    files = {"clip_name1": FILES["l"], "clip_name2": FILES["g"], "clip_name3": FILES["t5"]}
    graph = {"10": {"class_type": "TextencTripleCLIPLoader", "inputs": {**files, "device": "cpu"}},
             "11": {"class_type": "TripleCLIPLoader", "inputs": files}}
    saves = {}
    variants = {"full": (PROMPT_L, PROMPT_G, PROMPT_T5, "none"), "empty_t5": (PROMPT_L, PROMPT_G, "", "none"),
                "empty_t5_padded": (PROMPT_L, PROMPT_G, "", "empty_prompt"), "t5_only": ("", "", PROMPT_T5, "none")}
    for number, (variant, (clip_l, clip_g, t5xxl, padding)) in enumerate(variants.items()):
        texts = {"clip_l": clip_l, "clip_g": clip_g, "t5xxl": t5xxl, "empty_padding": padding}
        base = 20 + 3 * number
        graph[str(base)] = {"class_type": "TextencCLIPTextEncodeSD3", "inputs": {"clip": ["10", 0], **texts}}
        graph[str(base + 1)] = {"class_type": "CLIPTextEncodeSD3", "inputs": {"clip": ["11", 0], **texts}}
        graph[str(base + 2)] = {"class_type": "CLIPTextEncodeSD3", "inputs": {"clip": ["10", 0], **texts}}
        saves.update({f"sd3_{variant}_textenc": str(base), f"sd3_{variant}_comfy": str(base + 1),
                      f"sd3_{variant}_cross": str(base + 2)})
    graph["50"] = {"class_type": "TextencCLIPTextEncode", "inputs": {"clip": ["10", 0], "text": PROMPT_L}}
    graph["51"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["11", 0], "text": PROMPT_L}}
    saves.update({"sd3_plain_textenc": "50", "sd3_plain_comfy": "51"})
    return {**graph, **_saves(saves)}


def _saves(names: dict[str, str]) -> dict:
    return {f"9{index:02d}": {"class_type": "OracleSaveConditioning", "inputs": {"conditioning": [node, 0],
                                                                                 "name": name}}
            for index, (name, node) in enumerate(names.items())}


# --- comparison --------------------------------------------------------------------------

def compare(out: Path, *, families: bool = True) -> list[tuple[str, str, bool]]:
    import torch
    from safetensors.torch import load_file

    def load(name):
        return load_file(str(out / f"{name}.safetensors"))

    def same(a, b, key) -> tuple[bool, str]:
        if (key in a) != (key in b):
            return False, f"{key} only on one side"
        if key not in a:
            return True, f"{key} none"
        x, y = a[key], b[key]
        if x.shape != y.shape:
            return False, f"{key} shapes {tuple(x.shape)} vs {tuple(y.shape)}"
        diff = float((x - y).abs().max())
        scale = float(y.abs().max()) or 1.0
        return diff <= 1e-5 * scale + 1e-6, f"{key} {tuple(x.shape)} max|diff| {diff:.2e} (max|x| {scale:.3g})"

    rows = []
    pairs = [("flux_textenc", "flux_comfy"), ("flux_cross", "flux_comfy"),
             ("flux_textenc_comfy_guidance", "flux_comfy_textenc_guidance")]
    pairs += [(f"sd3_{v}_{side}", f"sd3_{v}_comfy") for v in ("full", "empty_t5", "empty_t5_padded", "t5_only")
              for side in ("textenc", "cross")]
    pairs += [("sd3_plain_textenc", "sd3_plain_comfy")]
    pairs = pairs if families else []
    pairs += [("ckpt_textenc", "ckpt_comfy")]
    for left, right in pairs:
        a, b = load(left), load(right)
        for key in ("cond", "pooled", "guidance"):
            ok, detail = same(a, b, key)
            rows.append((f"{left} vs {right}", detail, ok))
    if not families:
        return rows
    guided = load("flux_textenc_comfy_guidance")
    rows.append(("FluxGuidance sets 5.0", f"guidance {float(guided['guidance'])}", float(guided["guidance"]) == 5.0))
    rows.append(("CLIPTextEncodeFlux guidance 3.5", "", float(load("flux_textenc")["guidance"]) == 3.5))
    return rows


def stock_object_info(comfy: Path, args: argparse.Namespace) -> dict:
    """``/object_info`` of the server without custom nodes: ComfyUI's own names."""
    process = start_server(comfy, args.port, comfy / "textenc_oracle_out", comfy / "textenc_oracle_stock.log",
                           args.extra_path, ("--disable-all-custom-nodes",))
    try:
        return get(args.port, "/object_info")
    finally:
        process.terminate()
        process.wait(timeout=60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, type=Path, help="a ComfyUI source tree (a copy for this check)")
    parser.add_argument("--port", type=int, default=8199, help="the server's port (default: %(default)s)")
    parser.add_argument("--pack-only", action="store_true",
                        help="run only the node-pack checks of issue 28 (checkpoint loader, ComfyUI's CLIP "
                             "refused, display names), not the Flux and SD3 graphs")
    parser.add_argument("--keep", action="store_true", help="leave the tiny configs, models and nodes in place")
    parser.add_argument("--extra-path", action="append", default=[],
                        help="a folder put on the server's PYTHONPATH after textenc (e.g. a stand-in package)")
    args = parser.parse_args()
    comfy = args.comfyui.resolve()
    out = comfy / "textenc_oracle_out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    originals = tiny_configs(comfy)
    process = None
    try:
        write_models(comfy / "models" / "text_encoders")
        pack.write_checkpoint(comfy / "models" / "text_encoders" / FILES["l"], comfy / "models" / "checkpoints")
        install_nodes(comfy)
        stock = stock_object_info(comfy, args)
        process = start_server(comfy, args.port, out, comfy / "textenc_oracle_server.log", args.extra_path)
        info = get(args.port, "/object_info")
        missing = [n for n in ("TextencTripleCLIPLoader", "TextencCLIPTextEncodeFlux", "TextencCLIPTextEncodeSD3",
                               "TextencFluxGuidance", "CheckpointCLIPLoaderTextenc", "OracleSaveConditioning")
                   if n not in info]
        if missing:
            raise SystemExit(f"ComfyUI did not load {missing}; see the server log")
        graphs = [("flux", flux_graph()), ("sd3", sd3_graph())] if not args.pack_only else []
        graphs.append(("checkpoint", pack.checkpoint_graph(FILES["l"], _saves)))
        for name, graph in graphs:
            status = queue(args.port, graph)
            print(f"graph {name}: {status.get('status_str')}")
            if status.get("status_str") != "success":
                print(json.dumps(status.get("messages"), indent=1)[:4000])
                return 1
        refusals = {node: queue(args.port, pack.refusal_graph(FILES["l"], node, info, _saves))
                    for node in pack.REFUSING_NODES}
        rows = compare(out, families=not args.pack_only) + pack.display_rows(stock, info) + pack.refusal_rows(refusals)
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=60)
        if not args.keep:
            for relative, text in originals.items():
                (comfy / relative).write_text(text)
    for what, detail, ok in rows:
        print(f"{'ok  ' if ok else 'FAIL'}  {what:<62} {detail}")
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
