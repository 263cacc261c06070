"""Evaluation of a trained run: whole-split scores, predictions for new images, explanations.

evaluate (validation, the test and `--mode eval`; `load_variables` for other programs), predict
(`--mode predict` on image files), explain (class-activation maps and ROI crops per image).
"""
