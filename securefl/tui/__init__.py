"""securefl.tui: the hospital and administrator terminal apps (Textual).

The only package that imports Textual.  The apps call ``Hospital`` / ``HospitalSession`` /
``AdminSession`` and ``securefl.ml`` only, so everything they do also exists headless in the
CLI.  Network calls run in exclusive async workers, TensorFlow work in thread workers that
only post messages; screens get data as attributes and report what happened as messages.
"""
