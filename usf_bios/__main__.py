from usf_bios.cli import app

app()
