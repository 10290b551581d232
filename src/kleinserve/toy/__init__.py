"""The embedded toy model `flux-2-klein-toy`: its scenes (scenes.py), architecture (model.py), training
(train.py, `kleinserve toy train`) and evaluation (evaluate.py, `kleinserve toy eval`). The trained weights
live in kleinserve/models/flux-2-klein-toy/ and load through the engine like any checkpoint."""
