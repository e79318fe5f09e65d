"""Train and evaluate a recipe: the entry for `python run.py -f ...` and `composer -n N run.py -f ...`.

    python run.py -f yamls/quickstart_blurpool.yaml [key=value ...]
    composer -n 8 run.py -f yamls/resnet50_blurpool.yaml data.root=/data/imagenet

The work is in blurpool_algo.train (which `python -m blurpool_algo.train` also runs).
"""

import sys

from blurpool_algo.train import main

if __name__ == "__main__":
    sys.exit(main())
