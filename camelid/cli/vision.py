"""`camelid vision train | scenes | eval`: teach a frozen LLaMA to see, make pictures to ask it about, score it.

Asking a trained model about a picture is `camelid generate -m OUT/hf --image picture.png "What is in the picture?"`
(and `camelid chat -m OUT/hf --image picture.png`).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from camelid.cli.app import app
from camelid.errors import CamelidError

vision_app = typer.Typer(help="Vision: join an image encoder to a frozen LLaMA, train it on scenes, score it.",
                         no_args_is_help=True)
app.add_typer(vision_app, name="vision")


@vision_app.command("train")
def train(
    config: Path = typer.Argument(None, help="A YAML or TOML file of training settings (objective vision)."),
    set_: list[str] = typer.Option(None, "--set", "-s", help="Override a setting: key=value (repeat); "
                                   "vision settings as model.fusion=projector, model.every=5."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in the out folder."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train the image encoder and the cross-attention layers (or the projector) of a vision model on
    generated scenes, with the text model frozen; the model is written to OUT/hf."""
    from camelid.train.config import load_config, read_config_file
    from camelid.train.loop import train as run
    from camelid.vision.objective import VisionQA

    given = read_config_file(config) if config is not None else {}
    defaults = [f"{k}={v}" for k, v in (("objective", "vision"), ("data", "scenes"), ("model", "{}")) if k not in given]
    cfg = load_config(config, [*defaults, *(set_ or [])])
    if cfg.objective != "vision":
        raise CamelidError(f"objective is {cfg.objective!r}; `camelid vision train` trains objective vision "
                           "(use `camelid pretrain` for the others)")
    result = run(cfg, resume=resume, progress=progress, objective=VisionQA)
    typer.echo(f"done: {result.steps} steps in {result.seconds / 60:.1f} min, train loss {result.final_loss:.4f}; "
               f"{VisionQA.describe(result.val_metrics)}; the model is in {cfg.export_path}")


@vision_app.command("scenes")
def scenes(
    out: Path = typer.Argument(..., help="Folder for the pictures (PNG) and questions.jsonl."),
    n: int = typer.Option(12, "--n", "-n", min=1, max=10000, help="How many pictures."),
    held_out: bool = typer.Option(False, "--held-out", help="Held-out scenes (one unseen colour-shape pair each)."),
    size: int = typer.Option(48, min=8, max=1024, help="Picture size in pixels (the model's is 48 by default)."),
    seed: int = typer.Option(0),
) -> None:
    """Draw scenes like the training ones, with a question and answer of each kind for each picture."""
    import numpy as np

    from camelid.fileio import atomic_write, atomic_write_text
    from camelid.vision.data import KINDS, ask, random_scene

    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        scene = random_scene(rng, held_out=held_out)
        path = out / f"scene-{i:04d}.png"
        image = scene.render(size)
        atomic_write(path, lambda p, image=image: image.save(p, format="PNG"))
        for kind in KINDS:
            q = ask(scene, kind, scene.shapes[0])
            lines.append(json.dumps({"image": path.name, "kind": kind, "question": q.question, "answer": q.answer}))
    atomic_write_text(out / "questions.jsonl", "\n".join(lines) + "\n")
    typer.echo(f"wrote {n} pictures and {len(lines)} questions to {out}")


@vision_app.command("eval")
def evaluate(
    model: str = typer.Argument(..., help="A vision model folder (OUT/hf of `camelid vision train`)."),
    n: int = typer.Option(600, "--n", "-n", min=1, max=100000, help="Held-out questions to ask."),
    seen: bool = typer.Option(False, "--seen", help="Ask about seen combinations instead of held-out ones."),
    out: Path = typer.Option(None, "--out", "-o", help="Also write the results as JSON here."),
    speed: bool = typer.Option(True, "--speed/--no-speed", help="Also time decoding with an image."),
) -> None:
    """Ask the held-out questions by greedy generation (the Python API's path) and count exact answers; time the
    prefill and decode with a picture."""
    import camelid
    from camelid.fileio import atomic_write_text
    from camelid.vision.data import heldout_set, seen_set
    from camelid.vision.evaluate import answer_accuracy, decode_speed

    llm = camelid.load(model, quantize=None)
    if not hasattr(llm.model, "vision_config"):
        raise CamelidError(f"{model}: a text-only model; give a vision model folder (written by camelid vision train)")
    examples = (seen_set if seen else heldout_set)(n)
    result = answer_accuracy(llm, examples)
    kinds = ", ".join(f"{k} {v:.3f}" for k, v in result["by_kind"].items())
    typer.echo(f"exact match {result['exact_match']:.3f} on {result['questions']} "
               f"{'seen' if seen else 'held-out'} questions ({kinds})")
    if speed:
        result["speed"] = decode_speed(llm, examples[0][0])
        s = result["speed"]
        typer.echo(f"with an image: {s['prompt_tokens']} prompt tokens ({s['image_tokens']} for the image), "
                   f"prefill {1000 * s['prefill_s']:.0f} ms, decode {s['decode_tok_s']:.1f} tok/s")
    if out is not None:
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
