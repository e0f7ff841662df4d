"""The defaults every layer and the command line share, in a module that imports nothing heavy, so
`caitsearch --help` and usage errors answer without loading torch or timm."""

DEFAULT_MODEL = "deit_fmnist_patch4_32"  # the embedded model (caitsearch.models registers it with timm)
# held-out training images (see data.load_dataset); the defaults of every command, so they hold out the same ones
CALIB_SIZE, PROXY_SIZE, VAL_SIZE = 512, 512, 5000
# wall-time budget of a whole `search` run, in minutes: the final retraining gets what the earlier stages leave
DEFAULT_MINUTES = 18.0
