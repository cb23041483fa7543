from msnoop.cli import app

app(prog_name="msnoop")
