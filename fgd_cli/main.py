"""The `fgd` command: data, training, evaluation, export and a demo.

Only typer and the standard library are imported here; every command imports what it needs
(torch, fgd_core, workers) when it runs, so `fgd --help` is instant and loads no torch.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from fgd_cli import client
from fgd_cli.serve import serve as serve_command
from fgd_cli.sweep_cmd import sweep as sweep_command

app = typer.Typer(
    name="fgd",
    help="Knowledge distillation of object detectors with FGD (Focal and Global Distillation).",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain help: "[default: ...]" and <placeholders> print as written
)
data_app = typer.Typer(help="Prepare datasets.", no_args_is_help=True, rich_markup_mode=None)
train_app = typer.Typer(
    help="Train from a job spec (YAML or JSON); see workers/spec.py for the fields.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")

ConfigArg = Annotated[
    Path, typer.Argument(help="Job spec file (.yaml, .yml or .json).", show_default=False)
]
OutOpt = Annotated[
    Path | None,
    typer.Option("--out", "-o", help="Run folder [default: runs/<kind>-<timestamp>]."),
]
ResumeOpt = Annotated[
    Path | None, typer.Option("--resume", help="Checkpoint to resume from (checkpoint.pt).")
]


def _default_out(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


# --- data ---------------------------------------------------------------------------------------


@data_app.command("shapes")
def data_shapes(
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset folder.")],
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
    num_train: Annotated[int, typer.Option(help="Training images.")] = 4000,
    num_val: Annotated[int, typer.Option(help="Validation images.")] = 300,
    size: Annotated[int, typer.Option(help="Image side, px.")] = 128,
    num_classes: Annotated[int, typer.Option(help="Shape classes (1-6).")] = 4,
) -> None:
    """Generate the procedural shapes dataset (COCO format) and print its paths."""
    from fgd_cli.console import console, say, user_errors

    with user_errors():
        from fgd_core.data import ShapesConfig, generate_shapes

        config = ShapesConfig(
            seed=seed,
            num_train=num_train,
            num_val=num_val,
            image_size=size,
            num_classes=num_classes,
            max_size=min(ShapesConfig.max_size, size),
        )
        with console.status(f"generating {num_train} + {num_val} images"):
            ds = generate_shapes(out, config)
        say(f"root          {ds.root}")
        say(f"train_images  {ds.train_images}")
        say(f"train_ann     {ds.train_ann}")
        say(f"val_images    {ds.val_images}")
        say(f"val_ann       {ds.val_ann}")
        say(f"categories    {', '.join(ds.categories)}")


# --- train --------------------------------------------------------------------------------------


def _train(kind: str, config: Path, out: Path | None, resume: Path | None) -> None:
    from fgd_cli.console import CliError, console, metrics_table, say, user_errors

    with user_errors():
        from fgd_cli.runner import run_training
        from workers.spec import load_spec

        spec = load_spec(config)
        if spec.kind != kind:
            raise CliError(f"{config}: kind is {spec.kind!r}; run it with `fgd train {spec.kind}`")
        if getattr(spec, "sweep", None) is not None:
            raise CliError(f"{config} has a sweep section; run it with `fgd sweep`")
        out = out or _default_out(kind)
        outcomes = run_training(spec, out, resume_path=resume)
        main = outcomes[kind]
        rows: list[tuple[str, dict[str, float]]] = []
        times: list[str] = []
        if "teacher" in outcomes and kind != "teacher":
            rows.append(("teacher", outcomes["teacher"].metrics))
            times.append(f"{outcomes['teacher'].train_seconds:.1f} s")
        elif main.teacher_metrics:
            rows.append(("teacher", main.teacher_metrics))
            times.append("-")
        if "baseline" in outcomes:
            rows.append(("baseline", outcomes["baseline"].metrics))
            times.append(f"{outcomes['baseline'].train_seconds:.1f} s")
        rows.append((kind, main.metrics))
        times.append(f"{main.train_seconds:.1f} s")
        console.print(
            metrics_table(rows, title=f"val, {main.steps} steps", extra={"train time": times})
        )
        if main.fgd_hparams:
            hp = ", ".join(f"{k} {v:.3g}" for k, v in main.fgd_hparams.items())
            say(f"FGD hyperparameters at the end: {hp}")
        say(f"outputs in {out}")


@train_app.command("teacher")
def train_teacher(config: ConfigArg, out: OutOpt = None, resume: ResumeOpt = None) -> None:
    """Train a teacher (spec kind: teacher)."""
    _train("teacher", config, out, resume)


@train_app.command("baseline")
def train_baseline(config: ConfigArg, out: OutOpt = None, resume: ResumeOpt = None) -> None:
    """Train a student without distillation (spec kind: baseline)."""
    _train("baseline", config, out, resume)


@train_app.command("distill")
def train_distill(config: ConfigArg, out: OutOpt = None, resume: ResumeOpt = None) -> None:
    """Distill a student from a teacher with FGD (spec kind: distill).

    With teacher.train: true the teacher is trained first in OUT/teacher/; with baseline: true
    a baseline student is trained too, in OUT/baseline/.
    """
    _train("distill", config, out, resume)


# --- eval / export ------------------------------------------------------------------------------


@app.command("eval")
def eval_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="checkpoint.pt of a run, or a plain state dict (model.pt).")
    ],
    data: Annotated[
        Path | None,
        typer.Option(
            help="Dataset root (train/, val/, annotations/instances_*.json) or a job spec "
            "[default: the checkpoint's own data]."
        ),
    ] = None,
    split: Annotated[str, typer.Option(help="'val' or 'train'.")] = "val",
    arch: Annotated[str | None, typer.Option(help="Architecture (plain state dicts).")] = None,
    backbone: Annotated[str | None, typer.Option(help="Backbone (plain state dicts).")] = None,
    fpn_channels: Annotated[int | None, typer.Option(help="FPN channels.")] = None,
    min_size: Annotated[int | None, typer.Option(help="Shorter side after resize.")] = None,
    max_size: Annotated[int | None, typer.Option(help="Longer side cap after resize.")] = None,
    device: Annotated[str, typer.Option(help="'auto', 'cpu', 'cuda', ...")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    max_batches: Annotated[int | None, typer.Option(help="Evaluate this many batches.")] = None,
    detections: Annotated[
        Path | None, typer.Option(help="Write the COCO results JSON here.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write metrics here.")] = None,
) -> None:
    """Evaluate a trained network (COCO metrics)."""
    from fgd_cli.console import CliError, user_errors

    with user_errors():
        from fgd_cli.checkpoints import evaluate_checkpoint

        if split not in ("val", "train"):
            raise CliError(f"--split must be 'val' or 'train', got {split!r}")
        evaluate_checkpoint(
            checkpoint,
            data=data,
            split=split,
            overrides={
                "arch": arch,
                "backbone": backbone,
                "fpn_channels": fpn_channels,
                "min_size": min_size,
                "max_size": max_size,
            },
            device=device,
            batch_size=batch_size,
            max_batches=max_batches,
            detections_out=detections,
            metrics_out=json_out,
        )


@app.command("export")
def export_command(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint.pt of a training run.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="State dict file to write.")],
) -> None:
    """Write the trained network alone as a plain torchvision state dict.

    No FGD modules, no teacher, no optimizer: load it with fgd_core.detectors.load_weights
    into the model built from the same DetectorConfig.
    """
    from fgd_cli.console import say, user_errors

    with user_errors():
        from fgd_cli.checkpoints import export_checkpoint

        det = export_checkpoint(checkpoint, out)
        say(
            f"wrote {out}: {det.arch} {det.backbone}, fpn {det.fpn_channels}, "
            f"{det.num_classes} classes"
        )


# --- demo ---------------------------------------------------------------------------------------


@app.command("demo")
def demo_command(
    local: Annotated[
        bool,
        typer.Option(
            "--local", help="Train a teacher, a baseline and an FGD student here, no service."
        ),
    ] = False,
    quick: Annotated[bool, typer.Option(help="Tiny sizes, seconds not minutes (smoke test).")] = (
        False
    ),
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="--local: [default: runs/demo-<timestamp>]")
    ] = None,
    port: Annotated[int, typer.Option(help="The API's port (0: any free one).")] = 0,
) -> None:
    """The service end to end: start it, submit a small sweep over REST, show the leaderboard.

    Starts a Ray head, the MLflow server and the API (as `fgd serve` does), creates a token,
    submits the example sweep on the shapes data (`fgd sweep --example`) with POST /jobs,
    follows it with a progress bar, prints the leaderboard and how to open the runs in the
    MLflow UI, then stops everything. A few minutes on 2 CPU cores.

    With --local: trains a teacher, a baseline student and an FGD student in this process and
    compares them (no Ray, no MLflow, no API).
    """
    from fgd_cli.console import CliError, user_errors

    with user_errors():
        if local:
            from fgd_cli.demo import run_demo

            run_demo(out or _default_out("demo"), quick=quick)
            return
        if out is not None:
            raise CliError("--out is for --local; the service keeps its runs under FGD_HOME")
        from fgd_cli.demo_service import run_service_demo

        status = run_service_demo(port=port, quick=quick)
    raise typer.Exit(status)


# --- tokens -------------------------------------------------------------------------------------

token_app = typer.Typer(
    help="API tokens of the REST service.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    name_arg: Annotated[
        str | None, typer.Argument(metavar="NAME", help="Same as --name.", show_default=False)
    ] = None,
    name: Annotated[
        str | None,
        typer.Option("--name", help="Who or what the token is for [default: your user name]."),
    ] = None,
    admin: Annotated[bool, typer.Option(help="An admin token sees every job.")] = False,
    quota: Annotated[int | None, typer.Option(help="Concurrent jobs allowed.")] = None,
    database_url: Annotated[
        str | None, typer.Option(help="Job store [default: FGD_DATABASE_URL or SQLite].")
    ] = None,
) -> None:
    """Create an API token; it is printed once, alone on the last line, and stored only as a
    SHA-256 hash (`export FGD_TOKEN=$(fgd token create | tail -n 1)`)."""
    import getpass

    from fgd_cli.console import CliError, user_errors

    with user_errors():
        from service.cli_tokens import create

        if name_arg and name and name_arg != name:
            raise CliError(f"two names given: {name_arg!r} and --name {name!r}")
        try:
            label = name or name_arg or getpass.getuser()
        except (KeyError, OSError):  # no user name in this environment
            label = "cli"
        typer.echo(create(label, admin=admin, quota=quota, database_url=database_url))


# --- sweep --------------------------------------------------------------------------------------

app.command("sweep")(sweep_command)

# --- the service: run it, and talk to it --------------------------------------------------------

app.command("serve")(serve_command)
client.register(app)


if __name__ == "__main__":
    app()
