"""Learning from sessions: the five pattern models of the seed's "AI Application" lines.

``features`` turns a build (and the day) into model inputs, ``targets`` turns stored
sessions into training tables per pattern kind, ``training`` fits one scikit-learn
estimator per kind with build-grouped cross-validation against a per-family baseline and
writes the model card, ``store`` saves and loads ``<kind>.skops`` files with an explicit
list of trusted types, and ``predict`` answers for a build. scikit-learn and skops are
imported by these modules only, so the daemon pays for them only when models are used.
"""

#: The model card's file name in a models folder (here so that the daemon can look for it
#: without importing scikit-learn).
MODEL_CARD = "model_card.json"
