"""The web demo: a Gradio chat that talks only to the controller, through `ClusterClient`. Build it with
`web.app.create_app(WebConfig(...))`. Nothing is imported here, so reading its flags does not load Gradio."""
