"""`dreambooth-singlora ui`: the local web UI (needs the [ui] extra, gradio).

app.py    the command's flags, launch settings (host, logins, served paths), the handlers and the Gradio page
jobs.py   the job queue: CLI subprocesses, their state in <workspace>/jobs/<id>/, the runner thread
forms.py  a form's values -> the CLI command line, the run folder, checked uploads
runs.py   what the page shows of a job and a run, read from events files and run folders
paths.py  workspace path safety: what a typed path may name
testing.py  the app in a subprocess on a free port (tests)
"""
