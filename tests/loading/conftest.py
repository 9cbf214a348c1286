import os
import sys

# the tiny-checkpoint builders live beside the model tests
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "models"))
