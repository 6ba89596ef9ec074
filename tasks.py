"""MLPerf Training object detection (Mask R-CNN, COCO 2017) as Invoke tasks.

Each task is a thin step over the mlperf/ library; defaults come from invoke.yaml (`mlperf.*`).
Run `invoke --list`, or `fab -H work@127.0.0.1:9922 -i id_container <task>` for a Backend.AI host.
"""
import os
from pathlib import Path

import yaml
from invoke import Collection, task
from invoke.exceptions import Exit

from mlperf.storage import SCRATCH_OK_HELP, require_persistent
from mlperf.tasking import dataset_of, local_only, option, require_host, step, storage_dir
from object_detection.recipe import RULESET, RUNS
from object_detection.run_request import RunRequest

DATASET_HELP = "dataset name from the catalog: shapes (synthetic) or coco2017 (default from invoke.yaml)"
MANIFEST_HELP = "a dataset manifest YAML file instead of a built-in dataset"
DATA_DIR_HELP = ("folder that holds datasets, one subfolder each (default: data; in a Backend.AI session "
                 "with one vfolder and no choice made: <vfolder>/data)")
RESULTS_DIR_HELP = ("folder for results, checkpoints and background jobs (default: results; in a Backend.AI "
                    "session with one vfolder and no choice made: <vfolder>/results)")
DETACH_HELP = "run in the background in its own session, output to a log; see `status` and `logs`"
SUBMITTER_HELP, STATUS_HELP = RunRequest.helps()["submitter"], RunRequest.helps()["status"]
VERBOSE_HELP = "also print every MLPerf log record (they always go to the result file); MLPERF_LOG_ECHO=1 too"
DRY_RUN_HELP = "print the resolved run (config, batch, schedule, RCP, proposals, threads, ...) as JSON and " \
               "what this host lacks for it, then exit without starting anything"


@task(help={
    "dataset": DATASET_HELP,
    "manifest": MANIFEST_HELP,
    "data_dir": DATA_DIR_HELP,
    "mirror": "base URL that serves the same file names, used instead of each file's url",
    "source": "folder with archives you already have: hard-linked or copied, not downloaded",
    "jobs": "files downloaded at once (default 4)",
    "detach": DETACH_HELP,
})
@step
def fetch(c, dataset=None, manifest=None, data_dir=None, mirror=None, source=None, jobs=None,
          detach=False):
    """Download, check and unpack a dataset (or make the synthetic shapes set)."""
    from mlperf.datasets import fetch as fetching

    ds = dataset_of(c, dataset, manifest)
    fetching.fetch_dataset(ds, storage_dir(c, data_dir, "data_dir"), mirror=mirror, source=source,
                           jobs=option(c, jobs, "jobs"))  # checked there: --jobs abc or 0 is one error line


@task(help={
    "dataset": DATASET_HELP,
    "manifest": MANIFEST_HELP,
    "data_dir": DATA_DIR_HELP,
    "deep": "also decode every image, not only check that it exists and is non-empty",
    "force": "hash every archive again, even those verified before and unchanged since",
    "detach": DETACH_HELP,
})
@step
def verify(c, dataset=None, manifest=None, data_dir=None, deep=False, force=False, detach=False):
    """Check archives' md5 and the dataset's structure; exit 1 on any failure."""
    from mlperf.datasets import verify as verifying
    ds = dataset_of(c, dataset, manifest)
    verifying.verify_dataset(ds, storage_dir(c, data_dir, "data_dir"), deep=deep, force=force)


@task(help={
    "base": "base image (default: NGC PyTorch, from invoke.yaml; pytorch/pytorch:<ver>-cuda..-runtime works)",
    "output": "folder for the build context: Dockerfile, requirements.txt, the code (default: build/image)",
    "tag": "image name:tag to build; name a registry to --push (default: mlperf-maskrcnn:<base tag>)",
    "build": "run `docker build` where a Docker daemon answers; otherwise print the commands and exit 1",
    "push": "run `docker push` of --tag (needs a registry in the tag and a Docker daemon)",
    "check": "only validate the Backend.AI labels of this Dockerfile: each problem printed, exit 1 if any",
    "distro": "ai.backend.base-distro for a base not in the table (e.g. ubuntu22.04), or to override it",
    "python": "ai.backend.runtime-path: the base's python with torch (default: table, else /usr/bin/python3)",
    "gpu_arch": "the sessions' GPUs, e.g. sm_70 (V100): refuse a base known to lack their kernels (image.gpu_arch)",
    "cpu_only": "an image an agent without GPUs schedules (1 CPU, 1g, no GPU minimum): a rehearsal; tag ends -cpu",
})
@step
def image(c, base=None, output=None, tag=None, build=False, push=False, check=None, distro=None,
          python=None, gpu_arch=None, cpu_only=False):
    """Write a Backend.AI-ready image build context (labels checked); optionally build and push it."""
    if check:
        from mlperf.labels import check_dockerfile

        check_dockerfile(Path(check))
        return
    from mlperf import image as imaging

    imaging.make_image(
        base=option(c, base, "image.base"), output=Path(option(c, output, "image.output")),
        tag=option(c, tag, "image.tag") or None, build=build, push=push, distro=distro, python=python,
        resources=dict(option(c, None, "image.resources")), gpu_arch=option(c, gpu_arch, "image.gpu_arch") or None,
        cpu_only=cpu_only,
    )


@task(help={
    "dataset": DATASET_HELP,
    "manifest": MANIFEST_HELP,
    "data_dir": DATA_DIR_HELP,
    "gpus": "processes per node: GPUs (default: all detected), or CPU processes with --device cpu",
    "nodes": "'all' to start on every host of a Backend.AI cluster session (from main1)",
    "batch_size": "global batch size (default: the system configuration's)",
    "config": "named system configuration (see --list-configs); default: picked from the hardware",
    "list_configs": "print the system configurations and exit",
    "device": "cpu or cuda (default: cuda when a GPU is present)",
    "log": "MLPerf result log file (default: <results_dir>/train/result_0.txt)",
    "results_dir": RESULTS_DIR_HELP,
    "scratch_ok": SCRATCH_OK_HELP,
    "dry_run": DRY_RUN_HELP,
    "verbose": VERBOSE_HELP,
    "detach": DETACH_HELP,
    **RunRequest.helps(),  # seed, max_epochs, ruleset, submitter, status, speed, resume
})
@step
def train(c, dataset=None, manifest=None, data_dir=None, gpus=None, nodes=None, batch_size=None, config=None,
          list_configs=False, seed=None, max_epochs=None, resume=False, device=None, log=None, results_dir=None,
          ruleset=None, submitter=None, status=None, dry_run=False, verbose=False, scratch_ok=False, detach=False,
          speed=None):
    """Train Mask R-CNN with torchrun until the quality target (logs in MLPerf format)."""
    from mlperf import launch, planning

    echo_mlperf_records(verbose)
    if list_configs:
        planning.print_configs()
        return
    ds = dataset_of(c, dataset, manifest)
    log = Path(log) if log else storage_dir(c, results_dir, "results_dir") / "train" / "result_0.txt"
    if not dry_run:
        require_persistent("results", log.parent, "--results-dir", scratch_ok)
    request = RunRequest(seed=seed, max_epochs=max_epochs, ruleset=option(c, ruleset, "ruleset"),
                         speed=speed, resume=resume, **submission(c, submitter, status))
    code = launch.train(dataset=ds, data_dir=storage_dir(c, data_dir, "data_dir"), gpus=gpus, nodes=nodes,
                        batch_size=batch_size, config=config, device=device, log=log, request=request,
                        dry_run=dry_run)
    if code:
        raise Exit(f"error: training exited with code {code}; its output is above, the log is {log}", code=code)


@task(name="time", help={
    "runs": f"training runs in the series (default {RUNS}, as MLPerf requires; fewer than 3 gives no MLPerf score)",
    "results_dir": "folder for result series: <results_dir>/<series>/results/<system>/maskrcnn/ "
                   + RESULTS_DIR_HELP.removeprefix("folder for results, checkpoints and background jobs "),
    "series": "series name: resume this unfinished series (a finished one is refused); default: a new one "
              "named <date>-<time>-<dataset>",
    "system": "system name in the results folder (default: from the detected hardware)",
    "ruleset": f"MLPerf Training ruleset to check logs against (default {RULESET})",
    "from_logs": "score an existing folder of result_*.txt instead of training; the summary goes to "
                 "<results_dir>/scores/<folder name>/",
    "dataset": DATASET_HELP,
    "manifest": MANIFEST_HELP,
    "data_dir": DATA_DIR_HELP,
    "config": "named system configuration for the runs",
    "gpus": "GPUs per node (default: all detected)",
    "nodes": "'all': every run on every host of a Backend.AI cluster session (from main1)",
    "max_epochs": "epoch cap per run",
    "submitter": SUBMITTER_HELP,
    "status": STATUS_HELP,
    "dry_run": DRY_RUN_HELP + " (the series' first run; no series folder is made)",
    "verbose": VERBOSE_HELP,
    "scratch_ok": SCRATCH_OK_HELP,
    "detach": DETACH_HELP,
})
@step
def time_(c, runs=None, results_dir=None, series=None, system=None, ruleset=None, from_logs=None,
          dataset=None, manifest=None, data_dir=None, config=None, gpus=None, nodes=None, max_epochs=None, submitter=None,
          status=None, dry_run=False, verbose=False, scratch_ok=False, detach=False):
    """Run the training N times as an MLPerf submission and score it (run_and_time)."""
    from mlperf.results import series as result_series

    echo_mlperf_records(verbose)
    ruleset = option(c, ruleset, "ruleset")
    results_dir = storage_dir(c, results_dir, "results_dir")
    if from_logs:
        result_series.score_logs(Path(from_logs), ruleset=ruleset, results_dir=results_dir)
        return
    if not dry_run:
        require_persistent("results", results_dir, "--results-dir", scratch_ok)
    result_series.time_series(
        runs=option(c, runs, "runs"), results_dir=results_dir, series=series,  # checked there: --runs abc
        system=option(c, system, "system") or None, ruleset=ruleset,
        dataset=option(c, dataset, "dataset") if manifest is None else None,
        manifest=None if manifest is None else str(Path(manifest).resolve()),
        data_dir=storage_dir(c, data_dir, "data_dir"),
        config=config, gpus=gpus, nodes=nodes, max_epochs=max_epochs, dry_run=dry_run,
        **submission(c, submitter, status),
    )


@task(name="all", help={
    "dataset": DATASET_HELP,
    "manifest": MANIFEST_HELP,
    "data_dir": DATA_DIR_HELP,
    "results_dir": "folder for result series and the steps' stamps (<results_dir>/.all/<dataset>/); "
                   + RESULTS_DIR_HELP.removeprefix("folder for results, checkpoints and background jobs "),
    "runs": f"training runs (default {RUNS}, as MLPerf requires)",
    "build": "also build the image (needs Docker); otherwise only its context is written",
    "config": "named system configuration for the runs",
    "nodes": "'all': every run on every host of a Backend.AI cluster session (from main1)",
    "max_epochs": "epoch cap per run",
    "submitter": SUBMITTER_HELP,
    "status": STATUS_HELP,
    "verbose": VERBOSE_HELP,
    "scratch_ok": SCRATCH_OK_HELP,
    "detach": DETACH_HELP,
})
@step
def all_(c, dataset=None, manifest=None, data_dir=None, results_dir=None, runs=None, build=False, config=None,
         nodes=None, max_epochs=None, submitter=None, status=None, verbose=False, scratch_ok=False, detach=False):
    """fetch, verify, image, time: the whole benchmark, resuming where it stopped."""
    from mlperf import pipeline
    from mlperf.results.series import parse_runs

    echo_mlperf_records(verbose)
    runs = parse_runs(option(c, runs, "runs"))  # before anything runs: --runs abc is one line
    results_dir = storage_dir(c, results_dir, "results_dir")
    require_persistent("results", results_dir, "--results-dir", scratch_ok)
    pipeline.run_all(
        dataset=option(c, dataset, "dataset"), manifest=manifest, data_dir=storage_dir(c, data_dir, "data_dir"),
        results_dir=results_dir, runs=runs,
        ruleset=option(c, None, "ruleset"), system=option(c, None, "system") or None,
        jobs=int(option(c, None, "jobs")), image=dict(option(c, None, "image")),
        build=build, config=config, nodes=nodes, max_epochs=max_epochs, **submission(c, submitter, status),
    )


@task(iterable=["series"], help={
    "series": "a finished series of five runs under --results-dir (one per system; repeat for more)",
    "results_dir": "folder that holds the series (default: results)",
    "output": "folder for the tree: <output>/<org>/ and the checkers' logs (default: <results_dir>/package)",
    "submitter": "the organisation the logs name (checked; the tree is filed under it)",
    "ruleset": f"MLPerf Training ruleset to check against (default {RULESET})",
    "system_info": "JSON file of system-description fields this host cannot detect (cooling, memory "
                   "configuration, ...), for every system or keyed by system name",
})
@step
def package(c, series=None, results_dir=None, output=None, submitter=None, ruleset=None, system_info=None):
    """Assemble series into MLCommons' submission tree and run the package checker and summarizer."""
    from mlperf.results import package as packaging

    results_dir = storage_dir(c, results_dir, "results_dir")
    packaging.package(results_dir=results_dir, series=list(series or []), submitter=submitter,
                      output=Path(output) if output else results_dir / "package",
                      ruleset=option(c, ruleset, "ruleset"), image=dict(option(c, None, "image")),
                      system_info=Path(system_info) if system_info else None)


@task(help={
    "gpus": "GPUs to run on (one for now: multi-GPU scaling runs are not written yet)",
    "batch_sizes": "comma-separated per-GPU batch sizes (default 8,16,32)",
    "iterations": "timed iterations per measurement",
    "baseline": "also time torchvision's stock Mask R-CNN on the same batches (default on)",
    "output": "JSON file for the results (default: benchmarks/results/train_throughput-<date>.json)",
})
@step
def bench(c, gpus=None, batch_sizes="8,16,32", iterations=None, baseline=True, output=None):
    """Measure training-step throughput against torchvision's stock Mask R-CNN."""
    from mlperf import launch

    code = launch.bench(gpus=gpus, batch_sizes=batch_sizes, iterations=iterations, baseline=baseline,
                        output=output)
    if code:
        raise Exit(f"error: the benchmark exited with code {code}", code=code)


@task(help={"dataset": DATASET_HELP, "manifest": MANIFEST_HELP, "data_dir": DATA_DIR_HELP,
            "results_dir": RESULTS_DIR_HELP})
@step
def doctor(c, dataset=None, manifest=None, data_dir=None, results_dir=None):
    """Table of what the benchmark needs and what this host has; exit 1 if something is missing."""
    from mlperf import doctor as checkup
    ds = dataset_of(c, dataset, manifest)
    checkup.doctor(ds, data_dir=storage_dir(c, data_dir, "data_dir"),
                   results_dir=storage_dir(c, results_dir, "results_dir"))


@task(help={"data_dir": DATA_DIR_HELP, "results_dir": RESULTS_DIR_HELP, "json": "one JSON line"})
@step
def paths(c, data_dir=None, results_dir=None, json=False):
    """Where this host keeps datasets, results and background jobs, and whether they outlive a session."""
    from mlperf import storage

    storage.print_paths(storage_dir(c, data_dir, "data_dir"), storage_dir(c, results_dir, "results_dir"),
                        as_json=json)


@task(help={"results_dir": RESULTS_DIR_HELP})
@step
def status(c, results_dir=None):
    """Show background (--detach) jobs: running or finished, with their exit codes."""
    from mlperf import jobs

    jobs.status(jobs.jobs_dir(storage_dir(c, results_dir, "results_dir")))


@task(help={"follow": "keep printing new output until the job ends", "job": "job id (default: latest)",
            "results_dir": RESULTS_DIR_HELP})
@step
def logs(c, follow=False, job=None, results_dir=None):
    """Print a background job's output (default: the latest job)."""
    from mlperf import jobs

    code = jobs.logs(jobs.jobs_dir(storage_dir(c, results_dir, "results_dir")), job_id=job, follow=follow)
    if code:
        raise Exit(code=code)


@task(help={
    "path": "project folder on the host (default: ~/mlperf-maskrcnn)",
    "python": "python on the host that creates the environment (default python3), or runs the steps "
              "itself with --no-venv",
    "venv": "make .venv with --system-site-packages (default; reuses the image's torch); "
            "--no-venv: use --python as it is",
})
@local_only
def deploy(c, path=None, python=None, venv=True):
    """Sync this project to the `fab -H` host with rsync and set up its Python environment."""
    from mlperf import remote

    require_host(c, "deploy")
    remote.deploy(c, path=option(c, path, "remote.path"), python=option(c, python, "remote.python"),
                  venv=venv)


@task(help={"results_dir": "the host's results folder, as its steps were given it (default: where the host's "
                           "steps put them: `invoke paths` there; relative paths are under its project folder)",
            "local_dir": "local folder; results land in <local_dir>/<host>/ (default: this project's results_dir)"})
@local_only
def results(c, results_dir=None, local_dir=None):
    """Bring the `fab -H` host's results folder back to results/<host>/ (never deletes locally)."""
    from mlperf import remote

    require_host(c, "results")
    remote.fetch_results(c, local_dir=Path(option(c, local_dir, "results_dir")),
                         path=option(c, None, "remote.path"), results_dir=results_dir)


SESSION_NAME_HELP = "the session's name (invoke session.create prints it)"


@task(name="create", help={
    "gpus": "GPUs per node (-r cuda.device; default 8, mlperf.session.gpus)",
    "nodes": "containers; more than 1 makes a cluster running `invoke all --nodes all`",
    "cluster_mode": "where a cluster's containers go: multi-node (default: one per agent, as a cluster of GPU "
                    "machines needs) or single-node (all on one agent that has the resources for all of them)",
    "vfolder": "storage folder for data/ and results/, mounted at /home/work/<vfolder> (default mlperf-data)",
    "image": "image as Backend.AI registered it (default: mlperf.image.tag, the one `invoke image` builds)",
    "dataset": "what the session benchmarks (default coco2017, mlperf.session.dataset)",
    "runs": "training runs of `invoke all` inside (default: as MLPerf requires)",
    "cpu": "CPU cores per node (default: 4 per GPU, mlperf.session.per_gpu)",
    "mem": "memory per node, e.g. 256g (default: 32g per GPU)",
    "shmem": "shared memory (/dev/shm) per node, e.g. 64g (default: 8g per GPU)",
    "name": "session name (default: mlperf-<dataset>-<date>-<time>)",
    "dry_run": "print the `backend.ai session create` command and the session's spec; create nothing",
})
@local_only
def session_create(c, gpus=None, nodes=None, vfolder=None, image=None, dataset=None, runs=None, cpu=None,
                   mem=None, shmem=None, name=None, cluster_mode=None, dry_run=False):
    """Start the whole benchmark in a Backend.AI batch session, everything on a vfolder."""
    from mlperf import session, session_spec

    image = image or session_spec.default_image(option(c, None, "image.tag"), option(c, None, "image.base"))
    spec = session_spec.make_spec(
        name=name, image=image,
        vfolder=option(c, vfolder, "session.vfolder"), dataset=option(c, dataset, "session.dataset"),
        runs=option(c, runs, "runs"), gpus=option(c, gpus, "session.gpus"), nodes=option(c, nodes, "session.nodes"),
        cpu=cpu, mem=mem, shmem=shmem, per_gpu=dict(option(c, None, "session.per_gpu")),
        max_wait=option(c, None, "session.max_wait"), cluster_mode=cluster_mode,
    )
    session.create(spec, dry_run=dry_run, client=option(c, None, "session.client"))


@task(name="status", help={"name": SESSION_NAME_HELP})
@local_only
def session_status(c, name):
    """A Backend.AI session's state; once it ended, its result, and its exit code as this one's."""
    from mlperf import session

    code = session.status(name, client=option(c, None, "session.client"))
    if code:
        raise Exit(code=code)


@task(name="logs", help={"name": SESSION_NAME_HELP, "follow": "keep printing new output until the session ends, "
                                                             "then exit with its exit code"})
@local_only
def session_logs(c, name, follow=False):
    """A Backend.AI session's console."""
    from mlperf import session

    code = session.logs(name, follow=follow, client=option(c, None, "session.client"),
                        poll=float(option(c, None, "session.poll_seconds")))
    if code:
        raise Exit(code=code)


@task(name="results", help={"name": SESSION_NAME_HELP,
                            "vfolder": "the vfolder to read (default: the one the session mounts)",
                            "results_dir": "local folder; results land in <results_dir>/<session>/"})
@local_only
def session_results(c, name, vfolder=None, results_dir=None):
    """Bring results/ of the session's vfolder to results/<session>/ (never deletes locally)."""
    from mlperf import session_results as from_vfolder

    from_vfolder.results(name, vfolder=vfolder, results_dir=Path(option(c, results_dir, "results_dir")),
                         client=option(c, None, "session.client"),
                         stall_seconds=c.config.mlperf.session.get("stall_seconds", from_vfolder.STALL_SECONDS))


@task(name="destroy", help={"name": SESSION_NAME_HELP})
@local_only
def session_destroy(c, name):
    """Terminate a Backend.AI session (its vfolder keeps what it wrote)."""
    from mlperf import session

    session.destroy(name, client=option(c, None, "session.client"))


def echo_mlperf_records(verbose: bool) -> None:
    """--verbose: the trainers print every MLPerf record too (they read MLPERF_LOG_ECHO)."""
    if verbose:
        os.environ["MLPERF_LOG_ECHO"] = "1"


def submission(c, submitter, status) -> dict:
    """Who submits, from the flags or invoke.yaml (mlperf.submitter, mlperf.status), checked once here:
    MLPerf logs may not be edited afterwards, so a wrong value would cost the whole series."""
    from mlperf.results.system_desc import check_submission

    return check_submission(option(c, submitter, "submitter"), option(c, status, "status"))


def _project_defaults() -> dict:
    """invoke.yaml as collection defaults, so `fab` (which reads fabric.yaml, not invoke.yaml) has them
    too; the MLPerf facts (ruleset, run count) come from the recipe unless invoke.yaml overrides them."""
    with open(Path(__file__).with_name("invoke.yaml")) as fh:
        defaults = yaml.safe_load(fh)
    for key, value in (("ruleset", RULESET), ("runs", RUNS)):
        defaults["mlperf"].setdefault(key, value)
    return defaults


ns = Collection(fetch, verify, image, train, time_, all_, package, bench, doctor, paths, status, logs, deploy,
                results)
ns.add_collection(Collection("session", session_create, session_status, session_logs, session_results,
                             session_destroy))   # `invoke session.create ...`: run on this machine, never forwarded
ns.configure(_project_defaults())


@task(iterable=["with_"], help={
    "series": "your series under --results-dir (compare.md and compare.png are written beside it)",
    "from_logs": "instead of a series: a folder of result_*.txt (the comparison goes to <results_dir>/compare-<name>/)",
    "with_": "a published result's id (see --catalog) or a folder of result logs; repeat for more "
             "(default: the published results of the same accelerator and count, else the nearest count)",
    "results_dir": RESULTS_DIR_HELP,
    "data_dir": "folder whose published-maskrcnn/ caches the published logs (default: data)",
    "mirror": "base URL serving what https://raw.githubusercontent.com serves (owner/repo/commit/path)",
    "source": "folder holding checkouts of mlcommons/training_results_vX (named so): logs linked from there, not downloaded",
    "catalog": "print the published results the catalog holds and exit",
})
@step
def compare(c, series=None, from_logs=None, with_=None, results_dir=None, data_dir=None, mirror=None, source=None,
            catalog=False):
    """Your result beside the published MLPerf results of the same hardware, and where the time went."""
    from mlperf.results import compare as comparing

    if catalog:
        comparing.print_catalog()
        return
    comparing.compare(series=series, from_logs=from_logs, with_=list(with_ or []),
                      results_dir=storage_dir(c, results_dir, "results_dir"),
                      data_dir=storage_dir(c, data_dir, "data_dir"), mirror=mirror, source=source)


ns.add_task(compare)
