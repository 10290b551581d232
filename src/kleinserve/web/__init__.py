"""The web playground: plain HTML, CSS and ES modules served by the app itself (no build step).

routes.py serves `/` and `/web/<asset>`; the page talks to the server only through its public API (the BFL
async endpoint to submit, /v1/jobs to follow and fetch results), with the API key the user typed.
"""
