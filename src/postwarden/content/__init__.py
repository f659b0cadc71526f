"""Email content: templates, their rendering, lint and the visual builder's designs (issue 20)."""
