"""`dreambooth-singlora ui`: a local web UI to train, watch, generate, export and evaluate from the browser.

    dreambooth-singlora ui --workspace ~/dreambooth-ui              # http://127.0.0.1:7860
    dreambooth-singlora ui --host 0.0.0.0 --auth_file users.txt     # other machines: only with a password

The UI is a third caller of the CLI: it holds no training code. Each job (train, generate, export, eval score)
is a subprocess `python -m dreambooth_singlora.cli <command> ... --events FILE`, queued in the workspace and run
one at a time on each GPU (--gpus); the UI follows the events file. Closing the page or restarting the UI neither
stops nor loses a job: everything lives in the workspace folder.

Safety defaults: it binds 127.0.0.1; any other host is refused unless --auth or --auth_file is given; it never
makes a public share link. It reads and writes inside the workspace (and reads the base model, dataset and encoder
paths you name); a path typed into it that leaves the workspace by '..', a symlink or an absolute path is refused;
Gradio serves files from the workspace only. Uploads are decoded and checked as images, 3 to 20 photos of up to
25 MiB each.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import threading
import time
from pathlib import Path

from ..errors import UserError, cli_entry
from ..prompts import IDENTIFIER
from .jobs import Job, Queue
from .paths import check_name, inside


def build_parser() -> argparse.ArgumentParser:
    """The flags of `dreambooth-singlora ui` (imports neither gradio nor torch)."""
    from ..config import command_parser

    p = command_parser("ui", __doc__)
    p.add_argument("--workspace", default="dreambooth-ui", help="the folder every run, job and image lives in "
                   "(created if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but a loopback address needs "
                   "--auth or --auth_file")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--auth", action="append", default=[], metavar="USER:PASSWORD",
                   help="a login (repeat for more); prefer --auth_file, which other users of the machine cannot "
                   "read in the process list")
    p.add_argument("--auth_file", help="a file of logins, one USER:PASSWORD a line ('#' comments)")
    p.add_argument("--gpus", default="", help="comma-separated GPU ids: one job at a time on each, through "
                   "CUDA_VISIBLE_DEVICES (default: one job at a time on the devices the environment gives)")
    p.add_argument("--dataset_dir", default=os.environ.get("DREAMBOOTH_DATASET", ""),
                   help="default DreamBooth dataset folder offered in the Train tab (default: $DREAMBOOTH_DATASET)")
    p.add_argument("--base_model", default="", help="default base model offered in the Train tab")
    return p


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_auth(pairs, auth_file) -> list[tuple[str, str]]:
    """Logins from --auth USER:PASSWORD and --auth_file; UserError for one without a user or a password."""
    lines = [(f"--auth {i + 1}", p) for i, p in enumerate(pairs or [])]
    if auth_file:
        try:
            text = Path(auth_file).read_text(encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot read --auth_file {auth_file}: {e.strerror or e}") from None
        lines += [(f"{auth_file} line {n}", ln.strip()) for n, ln in enumerate(text.splitlines(), 1)
                  if ln.strip() and not ln.strip().startswith("#")]
        if not any(True for _ in lines):
            raise UserError(f"--auth_file {auth_file} has no login: write USER:PASSWORD lines")
    out = []
    for where, line in lines:
        user, sep, password = line.partition(":")
        if not sep or not user.strip() or not password:
            raise UserError(f"{where}: a login is USER:PASSWORD with both parts non-empty")
        out.append((user.strip(), password))
    return out


def launch_settings(args) -> dict:
    """Everything launch() gets, checked: the host against the logins, the workspace as the only served folder."""
    from .forms import MAX_PHOTO_BYTES

    auth = read_auth(args.auth, args.auth_file)
    if not is_loopback(args.host) and not auth:
        raise UserError(f"--host {args.host} would let other machines reach the UI: give --auth USER:PASSWORD or "
                        "--auth_file F, or keep the default 127.0.0.1 and use an SSH tunnel")
    ws = Path(args.workspace).expanduser().resolve()
    blocked = [str(Path(args.auth_file).resolve())] if args.auth_file else []
    blocked += [str(ws / "jobs"), str(ws / ".ui.lock")]  # command lines and the lock: never served
    return dict(server_name=args.host, server_port=args.port, auth=auth or None, share=False,
                allowed_paths=[str(ws)], blocked_paths=blocked, max_file_size=MAX_PHOTO_BYTES, ssr_mode=False,
                show_error=True, quiet=True, footer_links=[])


# ---------------------------------------------------------------- handlers (plain functions of the workspace)
class UI:
    """The handlers: each takes what a form holds and returns what the page shows. A UserError becomes the
    message of the tab (`message`)."""

    def __init__(self, workspace, queue: Queue | None = None, dataset_dir: str = "", base_model: str = ""):
        self.workspace = Path(workspace).expanduser().resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.queue = queue or Queue(self.workspace)
        self.dataset_dir, self.base_model = dataset_dir, base_model

    # -- train
    def prompt_preview(self, subject, noun, token) -> str:
        from ..prompts import get_subject
        from .forms import instance_prompt

        try:
            noun = (noun or "").strip() or (get_subject(subject).class_name if subject else "")
            prompt = instance_prompt(token or IDENTIFIER, noun)
            return f"Instance prompt: **{prompt}**  (class prompt: a photo of {noun})"
        except UserError as e:
            return f"Instance prompt: - ({e})"

    def class_noun(self, subject) -> str:
        """The class noun of a DreamBooth subject ('' for none)."""
        from ..prompts import get_subject

        return get_subject(subject).class_name if subject else ""

    def family(self, model, base_config="") -> str:
        from .forms import family_of

        return f"Model family: **{family_of(model, base_config)}**"

    def preset_note(self, preset) -> str:
        from .forms import PRESET_NOTES, preset_flags

        try:
            flags = preset_flags(preset)
        except UserError as e:
            return str(e)
        note = PRESET_NOTES[preset]
        if preset == "8 GB" and not flags.get("use_8bit_adam"):
            note += " - bitsandbytes is not installed here, so 8-bit Adam stays off"
        return f"Preset {preset}: {note}"

    def start_train(self, run, subject, dataset_dir, photos, noun, token, base_model, method, rank, steps, lr,
                    prior, resolution, validation_prompt, preset, report_to="tensorboard",
                    base_config="") -> tuple[str, str]:
        """Check the form, lay out the run, queue the training job: (message, job id or ''). The uploads are
        deleted once the run holds its copies; a refused form keeps them (the page still shows them), so the
        corrected Start reads them again."""
        from .forms import new_train

        try:
            argv, settings = new_train(self.workspace, dict(
                run=run, subject=subject, dataset_dir=dataset_dir, photos=photos, noun=noun, token=token,
                base_model=base_model, base_config=base_config, method=method, rank=rank, steps=steps,
                learning_rate=lr, prior=prior, resolution=resolution, validation_prompt=validation_prompt,
                preset=preset, report_to=report_to))
        except UserError as e:
            return f"Refused: {e}", ""
        self._drop_uploads(photos)
        job = self.queue.submit("train", argv, run=settings["run"], title=f"train {settings['run']}",
                                outputs={"adapter": f"runs/{settings['run']}/adapter"})
        return f"Queued training of run {settings['run']} ({settings['prompt']}) as job {job.id}", job.id

    def _drop_uploads(self, photos) -> None:
        """Gradio's copies of the uploads (inside the workspace's .gradio folder): deleted once copied into a run
        (Gradio's cache clean-up removes those of a refused form after a day)."""
        from .forms import upload_path

        upload_root = self.workspace / ".gradio"
        for f in photos or []:
            p = upload_path(f).resolve()
            if upload_root in p.parents:
                p.unlink(missing_ok=True)

    # -- jobs
    def job_choices(self, kind: str | None = None, jobs: list | None = None) -> list[tuple[str, str]]:
        """(label, id) of the jobs (of one kind), newest first; `jobs`: a list already read."""
        jobs = self.queue.jobs() if jobs is None else jobs
        return [(f"{j.title} - {j.status} [{j.id}]", j.id) for j in reversed(jobs) if kind in (None, j.kind)]

    def _job(self, job_id) -> Job:
        if not job_id:
            raise UserError("no job chosen")
        return self.queue.load(check_name(job_id, "job id"))

    def live(self, job_id) -> dict:
        """Status line, loss rows, lr/u rows, validation images and the log tail of a job."""
        from .runs import log_tail, progress, status_line

        try:
            job = self._job(job_id)
        except UserError as e:
            return dict(status=str(e), loss=[], sched=[], validation=[], log="", job=None)
        prog = progress(self.queue, job)
        return dict(status=status_line(job, prog), loss=prog["loss"], sched=prog["sched"],
                    validation=prog["validation"], log=log_tail(self.queue, job), job=job)

    def stop(self, job_id) -> str:
        try:
            job = self.queue.stop(self._job(job_id).id)
        except UserError as e:
            return f"Refused: {e}"
        return (f"Cancelled queued job {job.id}" if job.status == "cancelled" else
                f"Stop requested for {job.id}: it ends at its next step with a checkpoint; Resume continues it")

    def resume(self, job_id) -> tuple[str, str]:
        try:
            job = self.queue.resume(self._job(job_id).id)
        except UserError as e:
            return f"Refused: {e}", ""
        return f"Queued {job.title} again as job {job.id} (it resumes from its last checkpoint)", job.id

    def cancel(self, job_id) -> str:
        try:
            job = self.queue.cancel(self._job(job_id).id)
        except UserError as e:
            return f"Refused: {e}"
        return f"Cancelled job {job.id}"

    def queue_rows(self) -> list[list]:
        rows = []
        for j in reversed(self.queue.jobs()):
            started = time.strftime("%H:%M:%S", time.localtime(j.started)) if j.started else "-"
            took = f"{(j.ended or time.time()) - j.started:.0f} s" if j.started else "-"
            rows.append([j.id, j.kind, j.run, j.status, j.error, started, took, j.gpu or ""])
        return rows

    # -- runs
    def runs(self) -> list[list]:
        from .runs import runs_table

        return runs_table(self.queue)

    def run_names(self) -> list[str]:
        from .runs import run_names

        return run_names(self.workspace)

    def run_detail(self, run) -> dict:
        """Settings, status, the latest training job's loss rows and validation images, model card, files."""
        from .forms import read_run
        from .runs import model_card, progress, run_files, run_status

        try:
            settings = read_run(self.workspace, run)
        except UserError as e:
            return dict(status=str(e), settings={}, loss=[], validation=[], card="", files=[])
        status, error = run_status(self.queue, run)
        jobs = self.queue.jobs(run=run, kind="train")
        prog = progress(self.queue, jobs[-1]) if jobs else {"loss": [], "validation": []}
        shown = {k: v for k, v in settings.items() if k != "argv"}
        return dict(status=f"{run}: {status}" + (f": {error}" if error else ""), settings=shown, loss=prog["loss"],
                    validation=prog["validation"], card=model_card(self.queue, run), files=run_files(self.queue, run))

    # -- generate
    def generate(self, run, prompts, seed, n, scale, steps, guidance, scheduler, eval_prompts=False,
                 size=None) -> tuple[str, str]:
        from .forms import new_generate

        try:
            argv, out = new_generate(self.workspace, run, prompts, seed, n, scale, steps, guidance, scheduler,
                                     eval_prompts, int(size) if size else None)
        except UserError as e:
            return f"Refused: {e}", ""
        rel = out.relative_to(self.workspace).as_posix()
        job = self.queue.submit("generate", argv, run=run, title=f"generate {run}", outputs={"images": rel})
        return f"Queued generation for {run} as job {job.id}", job.id

    def generate_view(self, job_id) -> dict:
        """Status, the gallery (image, 'prompt - seed') and, once finished, a zip of the images."""
        from .runs import gallery, progress, status_line

        try:
            job = self._job(job_id)
            if "images" not in job.outputs:
                raise UserError(f"job {job.id} is a {job.kind} job: it made no images; choose a generation job")
            folder = inside(self.workspace, job.outputs.get("images", ""), "image folder")
        except UserError as e:  # no such job, or a job of another kind (it has no image folder)
            return dict(status=str(e), gallery=[], zip=None)
        z = None
        if job.status == "finished" and folder.is_dir():
            z = folder.parents[2] / "downloads" / f"{folder.parent.name}.zip"  # runs/<run>/downloads/<set>.zip
            if not z.is_file():
                z.parent.mkdir(parents=True, exist_ok=True)
                import shutil

                # every page's timer asks at once: each call writes its own file, then renames it whole onto z
                part = f"{z.with_suffix('')}.part-{os.getpid()}-{threading.get_ident()}"
                try:
                    os.replace(shutil.make_archive(part, "zip", folder), z)
                finally:
                    Path(part + ".zip").unlink(missing_ok=True)
            z = str(z)
        return dict(status=status_line(job, progress(self.queue, job)), gallery=gallery(folder), zip=z)

    # -- export
    def export(self, run, fmt, timeout: float = 300.0) -> tuple[str, str | None]:
        """Queue the export (it needs no GPU: it starts at once) and wait for its file."""
        from .forms import new_export

        try:
            argv, out = new_export(self.workspace, run, fmt)
        except UserError as e:
            return f"Refused: {e}", None
        job = self.queue.submit("export", argv, run=run, title=f"export {run} ({fmt})", needs_gpu=False,
                                outputs={"file": out.relative_to(self.workspace).as_posix()})
        try:
            job = self.queue.wait(job.id, timeout)
        except TimeoutError as e:
            return str(e), None
        if job.status != "finished" or not out.is_file():
            return f"Export failed: {job.error or job.status}", None
        return f"Exported {run} as a {fmt} LoRA: {out.name} ({out.stat().st_size / 2**20:.2f} MiB)", str(out)

    # -- evaluate
    def image_sets(self, run) -> list[str]:
        from .forms import image_sets

        try:
            return image_sets(self.workspace, run)
        except UserError:
            return []

    def evaluate(self, run, image_set, clip, dino) -> tuple[str, str]:
        from .forms import new_eval

        try:
            argv, out = new_eval(self.workspace, run, image_set, clip, dino)
        except UserError as e:
            return f"Refused: {e}", ""
        job = self.queue.submit("eval", argv, run=run, title=f"score {run}/{image_set}",
                                outputs={"report": out.relative_to(self.workspace).as_posix(),
                                         "images": f"runs/{run}/images/{image_set}"})
        return f"Queued scoring of {run}/{image_set} as job {job.id}", job.id

    def eval_view(self, job_id) -> dict:
        """Status, the report's summary table and per-prompt table (header + rows), the per-prompt grids."""
        import csv

        from .runs import status_line

        try:
            job = self._job(job_id)
            if "report" not in job.outputs:
                raise UserError(f"job {job.id} is a {job.kind} job: it wrote no report; choose a scoring job")
            out = inside(self.workspace, job.outputs.get("report", ""), "report folder")
            images = inside(self.workspace, job.outputs.get("images", ""), "image folder")
        except UserError as e:  # no such job, or a job of another kind (it has no report)
            return dict(status=str(e), summary=[], per_prompt=[], grids=[])

        def table(name):
            f = out / name
            if not f.is_file():
                return []
            with open(f, newline="", encoding="utf-8") as fh:
                return list(csv.reader(fh))

        grids = []
        for sheet in sorted(images.glob("*/contact_sheet.png")):
            grids.append((str(sheet), f"{sheet.parent.name}: one row per prompt"))
        if (out / "report.png").is_file():
            grids.append((str(out / "report.png"), "report plot"))
        summary = table("report.csv")
        if summary and "n_images" in summary[0]:  # the groups with no images (e.g. 'object' for a dog) left out
            n = summary[0].index("n_images")
            summary = [summary[0], *(r for r in summary[1:] if r[n] not in ("", "0"))]
        return dict(status=status_line(job), summary=summary, per_prompt=table("per_prompt.csv"),
                    grids=grids if job.status == "finished" else [])


# ---------------------------------------------------------------- the page
def build_app(ui: UI, default_base: str = "", default_dataset: str = ""):
    """The Blocks of the UI over `ui`'s handlers."""
    import gradio as gr
    import pandas as pd

    from ..prompts import subjects
    from .forms import METHODS, PRESETS, SCHEDULERS

    nominal = {"subject", "series", "run", "status", "error", "prompt", "method", "base model", "created", "job",
               "kind", "started", "time", "gpu"}

    def frame(rows, cols):
        """A table or plot's rows as a DataFrame; empty, it keeps the column types (a plot's colour column nominal)."""
        if rows and isinstance(rows[0], dict):
            rows = [[r[c] for c in cols] for r in rows]
        if rows:
            return pd.DataFrame(rows, columns=cols)
        return pd.DataFrame({c: pd.Series(dtype=str if c in nominal else float) for c in cols})

    def table_frame(rows):
        return pd.DataFrame(rows[1:], columns=rows[0]) if rows else pd.DataFrame()

    def dd(choices, value=None):
        values = [c[1] if isinstance(c, tuple) else c for c in choices]
        return gr.Dropdown(choices=choices, value=value if value in values else (values[0] if values else None))

    subject_names = [""] + list(subjects())
    # Gradio's copies of what it served (in <workspace>/.gradio) older than a day are deleted, checked hourly
    with gr.Blocks(title="DreamBooth SingLoRA", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## DreamBooth SingLoRA\nWorkspace: `{ui.workspace}` - every job is a `dreambooth-singlora` "
                    "command; its files stay in the workspace.")
        with gr.Tabs() as tabs:
            # 1. Train
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                with gr.Row():
                    with gr.Column():
                        run = gr.Textbox(label="Run name", value=f"run-{time.strftime('%Y%m%d-%H%M')}",
                                         elem_id="train-run")
                        photos = gr.File(label="Photos of the subject (3-20)", file_count="multiple",
                                         file_types=["image"], elem_id="train-photos")
                        with gr.Row():
                            subject = gr.Dropdown(subject_names, value="", label="or a DreamBooth subject",
                                                  elem_id="train-subject")
                            dataset = gr.Textbox(label="DreamBooth dataset folder (for a subject)",
                                                 value=default_dataset, elem_id="train-dataset")
                        with gr.Row():
                            noun = gr.Textbox(label="Class noun", value="dog", elem_id="train-noun")
                            token = gr.Textbox(label="Rare token", value=IDENTIFIER, elem_id="train-token")
                        prompt_md = gr.Markdown(ui.prompt_preview("", "dog", IDENTIFIER))
                        base = gr.Textbox(label="Base model (hub id, local folder or .safetensors file)",
                                          value=default_base, elem_id="train-base")
                        base_cfg = gr.Textbox(label="Base config (only for a single .safetensors file: a diffusers "
                                              "folder or hub id of the same family)", elem_id="train-base-config")
                        family_md = gr.Markdown(ui.family(default_base) if default_base else "Model family: -",
                                                elem_id="train-family")
                    with gr.Column():
                        with gr.Row():
                            method = gr.Dropdown(list(METHODS), value="singlora", label="Method")
                            rank = gr.Number(8, label="Rank", precision=0)
                        with gr.Row():
                            steps = gr.Number(400, label="Steps", precision=0, elem_id="train-steps")
                            lr = gr.Number(1e-4, label="Learning rate")
                        with gr.Row():
                            resolution = gr.Number(None, label="Resolution (empty: the base's own)", precision=0,
                                                   elem_id="train-resolution")
                            prior = gr.Checkbox(False, label="Prior preservation")
                        validation = gr.Textbox(label="Validation prompts (one a line; empty = none)", lines=2,
                                                elem_id="train-validation")
                        preset = gr.Radio(list(PRESETS), value="none", label="GPU-memory preset")
                        preset_md = gr.Markdown(ui.preset_note("none"))
                        report_to = gr.Dropdown(["tensorboard", "none"], value="tensorboard", label="Tracker",
                                                elem_id="train-tracker")
                        start = gr.Button("Start training", variant="primary", elem_id="train-start")
                train_msg = gr.Markdown(elem_id="train-msg")
                for comp in (subject, noun, token):
                    comp.change(ui.prompt_preview, [subject, noun, token], prompt_md, api_visibility="private")
                subject.change(lambda s: ui.class_noun(s) or gr.skip(), subject, noun, api_visibility="private")
                # on leaving the box (not each keystroke: a hub id may be looked up)
                base.blur(ui.family, [base, base_cfg], family_md, api_name="family")
                base.submit(ui.family, [base, base_cfg], family_md, api_visibility="private")
                base_cfg.blur(ui.family, [base, base_cfg], family_md, api_visibility="private")
                preset.change(ui.preset_note, preset, preset_md, api_visibility="private")

            # 2. Live run
            with gr.Tab("Live run", id="live", elem_id="tab-live"):
                live_job = gr.Dropdown(ui.job_choices("train"), label="Training job", elem_id="live-job",
                                       allow_custom_value=True)
                live_status = gr.Markdown(elem_id="live-status")
                with gr.Row():
                    loss_plot = gr.LinePlot(frame([], ["step", "loss", "subject"]), x="step", y="loss",
                                            title="Loss", elem_id="live-loss", height=240)
                    lr_plot = gr.LinePlot(frame([], ["step", "lr"]), x="step", y="lr", title="Learning rate",
                                          elem_id="live-lr", height=240)
                    u_plot = gr.LinePlot(frame([], ["step", "u"]), x="step", y="u", title="u(t): SingLoRA's ramp",
                                         elem_id="live-u", height=240)
                live_val = gr.Gallery(label="Validation images", columns=5, height=240, elem_id="live-val")
                with gr.Row():
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="live-stop")
                    resume_btn = gr.Button("Resume", elem_id="live-resume")
                live_msg = gr.Markdown()
                live_log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=8)

            # 3. Runs
            with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                runs_cols = ["run", "status", "error", "prompt", "method", "steps", "base model", "created"]
                runs_df = gr.Dataframe(frame(ui.runs(), runs_cols), interactive=False, elem_id="runs-table")
                runs_refresh = gr.Button("Refresh", size="sm")
                run_pick = gr.Dropdown(ui.run_names(), label="Run", elem_id="runs-pick", allow_custom_value=True)
                run_status = gr.Markdown(elem_id="runs-status")
                with gr.Row():
                    run_settings = gr.JSON(label="Settings")
                    run_loss = gr.LinePlot(frame([], ["step", "loss", "subject"]), x="step", y="loss",
                                           title="Loss", height=260)
                run_val = gr.Gallery(label="Validation images", columns=4, height=200)
                run_card = gr.Markdown(label="Model card")
                run_files = gr.File(label="Files", file_count="multiple", interactive=False)

            # 4. Generate
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                with gr.Row():
                    with gr.Column():
                        gen_run = gr.Dropdown(ui.run_names(), label="Adapter (run)", elem_id="gen-run",
                                              allow_custom_value=True)
                        gen_prompts = gr.Textbox(label="Prompts (one a line)", lines=3, elem_id="gen-prompts")
                        gen_eval = gr.Checkbox(False, label="the subject's 25 evaluation prompts instead",
                                               elem_id="gen-eval")
                        with gr.Row():
                            gen_seed = gr.Number(0, label="Seed", precision=0)
                            gen_n = gr.Number(4, label="Images per prompt", precision=0, elem_id="gen-n")
                            gen_scale = gr.Slider(0, 2, value=1.0, step=0.05, label="Strength (adapter scale)")
                        with gr.Row():
                            gen_steps = gr.Number(30, label="Steps", precision=0, elem_id="gen-steps")
                            gen_guidance = gr.Number(7.5, label="Guidance")
                            gen_sched = gr.Dropdown(list(SCHEDULERS), value="dpm++", label="Sampler")
                            gen_size = gr.Number(0, label="Size (0 = the model's)", precision=0, elem_id="gen-size")
                        gen_btn = gr.Button("Generate", variant="primary", elem_id="gen-start")
                    with gr.Column():
                        gen_job = gr.Dropdown(ui.job_choices("generate"), label="Generation job",
                                              allow_custom_value=True)
                        gen_status = gr.Markdown(elem_id="gen-status")
                        gen_gallery = gr.Gallery(label="Images (prompt - seed)", columns=4, height=360,
                                                 elem_id="gen-gallery")
                        gen_zip = gr.File(label="Download all (zip)", interactive=False)

            # 5. Export
            with gr.Tab("Export", id="export", elem_id="tab-export"):
                exp_run = gr.Dropdown(ui.run_names(), label="Adapter (run)", elem_id="exp-run", allow_custom_value=True)
                exp_fmt = gr.Radio(["kohya", "diffusers"], value="kohya", label="Layout",
                                   info="kohya loads in A1111, ComfyUI, kohya and diffusers; diffusers only in "
                                   "diffusers")
                exp_btn = gr.Button("Export", variant="primary", elem_id="exp-start")
                exp_msg = gr.Markdown(elem_id="exp-msg")
                exp_file = gr.File(label="LoRA file", interactive=False)

            # 6. Evaluate
            with gr.Tab("Evaluate", id="evaluate", elem_id="tab-evaluate"):
                with gr.Row():
                    ev_run = gr.Dropdown(ui.run_names(), label="Run (a DreamBooth subject)", allow_custom_value=True)
                    ev_set = gr.Dropdown([], label="Image set (Generate with the 25 evaluation prompts)",
                                         allow_custom_value=True, elem_id="ev-set")
                with gr.Row():
                    ev_clip = gr.Textbox(label="CLIP ViT-B/32 checkpoint (file or open_clip folder)", elem_id="ev-clip")
                    ev_dino = gr.Textbox(label="DINO ViT-S/16 checkpoint (file or timm folder)", elem_id="ev-dino")
                ev_btn = gr.Button("Score", variant="primary", elem_id="ev-start")
                ev_job = gr.Dropdown(ui.job_choices("eval"), label="Scoring job", allow_custom_value=True)
                ev_status = gr.Markdown(elem_id="ev-status")
                ev_summary = gr.Dataframe(label="Report", interactive=False)
                ev_prompts = gr.Dataframe(label="Per prompt", interactive=False)
                ev_grids = gr.Gallery(label="Per-prompt grids", columns=2, height=360)

            # 7. Queue
            with gr.Tab("Queue", id="queue", elem_id="tab-queue"):
                q_cols = ["job", "kind", "run", "status", "error", "started", "time", "gpu"]
                q_df = gr.Dataframe(frame(ui.queue_rows(), q_cols), interactive=False, elem_id="queue-table")
                q_refresh = gr.Button("Refresh", size="sm")
                with gr.Row():
                    q_job = gr.Dropdown(ui.job_choices(), label="Job", allow_custom_value=True)
                    q_cancel = gr.Button("Cancel (queued)")
                    q_stop = gr.Button("Stop (running)", variant="stop")
                q_msg = gr.Markdown()

        # ---- wiring
        def on_start(*values):
            msg, job_id = ui.start_train(*values)
            if not job_id:
                return msg, gr.skip(), gr.skip(), gr.skip()
            return msg, dd(ui.job_choices("train"), job_id), gr.Tabs(selected="live"), None

        start.click(on_start, [run, subject, dataset, photos, noun, token, base, method, rank, steps, lr, prior,
                               resolution, validation, preset, report_to, base_cfg],
                    [train_msg, live_job, tabs, photos],
                    api_name="start_train")

        def on_live(job_id):
            v = ui.live(job_id)
            def series(name):
                return frame([[r["step"], r["value"]] for r in v["sched"] if r["series"] == name], ["step", name])

            return (v["status"], frame(v["loss"], ["step", "loss", "subject"]), series("lr"), series("u"),
                    v["validation"], v["log"])

        live_outputs = [live_status, loss_plot, lr_plot, u_plot, live_val, live_log]
        live_job.change(on_live, live_job, live_outputs, api_name="live")
        stop_btn.click(ui.stop, live_job, live_msg, api_name="stop")

        def on_resume(job_id):
            msg, new = ui.resume(job_id)
            return msg, dd(ui.job_choices("train"), new) if new else gr.skip()

        resume_btn.click(on_resume, live_job, [live_msg, live_job], api_name="resume")

        def on_run(name):
            d = ui.run_detail(name)
            return (d["status"], d["settings"], frame(d["loss"], ["step", "loss", "subject"]), d["validation"],
                    d["card"], d["files"] or None)

        run_pick.change(on_run, run_pick, [run_status, run_settings, run_loss, run_val, run_card, run_files],
                        api_name="run_detail")

        def on_generate(*values):
            msg, job_id = ui.generate(*values)
            return msg, dd(ui.job_choices("generate"), job_id) if job_id else gr.skip()

        gen_btn.click(on_generate, [gen_run, gen_prompts, gen_seed, gen_n, gen_scale, gen_steps, gen_guidance,
                                    gen_sched, gen_eval, gen_size], [gen_status, gen_job], api_name="generate")

        def on_gen_view(job_id):
            v = ui.generate_view(job_id)
            return v["status"], v["gallery"], v["zip"]

        gen_job.change(on_gen_view, gen_job, [gen_status, gen_gallery, gen_zip], api_name="generate_view")
        exp_btn.click(ui.export, [exp_run, exp_fmt], [exp_msg, exp_file], api_name="export")
        ev_run.change(lambda r: dd(ui.image_sets(r)), ev_run, ev_set, api_visibility="private")

        def on_eval(*values):
            msg, job_id = ui.evaluate(*values)
            return msg, dd(ui.job_choices("eval"), job_id) if job_id else gr.skip()

        ev_btn.click(on_eval, [ev_run, ev_set, ev_clip, ev_dino], [ev_status, ev_job], api_name="evaluate")

        def on_eval_view(job_id):
            v = ui.eval_view(job_id)
            return v["status"], table_frame(v["summary"]), table_frame(v["per_prompt"]), v["grids"]

        ev_job.change(on_eval_view, ev_job, [ev_status, ev_summary, ev_prompts, ev_grids], api_name="eval_view")
        runs_refresh.click(lambda: frame(ui.runs(), runs_cols), None, runs_df, api_name="runs")
        q_refresh.click(lambda: frame(ui.queue_rows(), q_cols), None, q_df, api_name="queue")
        q_cancel.click(ui.cancel, q_job, q_msg, api_name="cancel")
        q_stop.click(ui.stop, q_job, q_msg, api_visibility="private")

        # one timer follows every live thing: the chosen jobs, the run shown, the queue, the lists of runs and jobs.
        # A part is sent again only when it changed (a gallery resent every tick would be copied every tick, and a
        # dropdown updated while open would close under the pointer).
        timer = gr.Timer(1.5)
        seen = gr.State({})

        def on_tick(seen, live_id, gen_id, ev_id, q_id, run_name, gen_r, exp_r, ev_r, ev_s):
            seen, out = dict(seen or {}), []

            def part(key, signature, make, n=1):
                if seen.get(key) == repr(signature):
                    out.extend([gr.skip()] * n)
                    return
                seen[key] = repr(signature)
                values = make()
                out.extend(values if n > 1 else [values])

            v = ui.live(live_id) if live_id else None
            part("live", (live_id, v and (v["status"], len(v["loss"]), len(v["validation"]), v["log"][-300:])),
                 lambda: on_live(live_id), 6)
            g = ui.generate_view(gen_id) if gen_id else None
            part("gen", (gen_id, g and (g["status"], len(g["gallery"]), g["zip"])), lambda: on_gen_view(gen_id), 3)
            e = ui.eval_view(ev_id) if ev_id else None
            part("eval", (ev_id, e and (e["status"], len(e["grids"]))), lambda: on_eval_view(ev_id), 4)
            q_rows, r_rows = ui.queue_rows(), ui.runs()
            part("queue", q_rows, lambda: frame(q_rows, q_cols))
            part("runs", r_rows, lambda: frame(r_rows, runs_cols))
            part("run", (run_name, [r for r in r_rows if r[0] == run_name]), lambda: on_run(run_name), 6)
            names, jobs = ui.run_names(), ui.queue.jobs()
            for key, choices, current in (("j-train", ui.job_choices("train", jobs), live_id),
                                          ("j-gen", ui.job_choices("generate", jobs), gen_id),
                                          ("j-eval", ui.job_choices("eval", jobs), ev_id),
                                          ("j-all", ui.job_choices(None, jobs), q_id),
                                          ("r-runs", names, run_name), ("r-gen", names, gen_r),
                                          ("r-exp", names, exp_r), ("r-ev", names, ev_r)):
                part(key, choices, lambda c=choices, v=current: dd(c, v))
            sets = ui.image_sets(ev_r) if ev_r else []
            part("sets", (ev_r, sets), lambda: dd(sets, ev_s))
            return [seen, *out]

        timer.tick(on_tick, [seen, live_job, gen_job, ev_job, q_job, run_pick, gen_run, exp_run, ev_run, ev_set],
                   [seen, *live_outputs, gen_status, gen_gallery, gen_zip, ev_status, ev_summary, ev_prompts, ev_grids,
                    q_df, runs_df, run_status, run_settings, run_loss, run_val, run_card, run_files,
                    live_job, gen_job, ev_job, q_job, run_pick, gen_run, exp_run, ev_run, ev_set],
                   show_progress="hidden", api_visibility="private")
    return demo


@cli_entry
def main(argv=None):
    args = build_parser().parse_args(argv)
    settings = launch_settings(args)
    ws = Path(args.workspace).expanduser().resolve()
    ws.mkdir(parents=True, exist_ok=True)
    # Gradio's uploads and cache inside the workspace; no usage analytics (and no network) from it
    os.environ["GRADIO_TEMP_DIR"] = str(ws / ".gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] or [None]
    try:
        import gradio as gr
    except ImportError:
        raise UserError("the web UI needs gradio: pip install 'dreambooth-singlora[ui]'") from None
    queue = Queue(ws, slots=gpus).start()
    ui = UI(ws, queue, dataset_dir=args.dataset_dir, base_model=args.base_model)
    demo = build_app(ui, default_base=args.base_model, default_dataset=args.dataset_dir)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])  # no web fonts: nothing fetched
    print(f"web UI of workspace {ws} on http://{args.host}:{args.port}", flush=True)
    try:
        demo.queue(default_concurrency_limit=4).launch(theme=theme, **settings)
    finally:
        queue.close()


if __name__ == "__main__":
    main()
