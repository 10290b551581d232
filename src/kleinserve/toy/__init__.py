"""The embedded toy model `flux-2-klein-toy`: its scenes (scenes.py), architecture (model.py), training
(train.py's stages, `kleinserve toy train`, set by config.py, the transformer's loop in fit.py, its data in
flow.py) and evaluation (evaluate.py and shapes.py, `kleinserve toy eval`). The trained weights live in
kleinserve/models/flux-2-klein-toy/ and load through the engine like any checkpoint."""
