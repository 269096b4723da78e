"""HTTP: the Flask app, body reading, auth, limits and CORS, OpenAPI and the blueprints.
The only package that imports Flask."""
