"""Designs the design tests share: one that uses every block type."""

from __future__ import annotations

from typing import Any

IMG = "https://img.example.test"


def every_block() -> dict[str, Any]:
    """A design holding each block type once or more, with Jinja in the places it may
    go; section 1 is two 50 % columns (the browser test reads their layout)."""
    return {
        "version": 1,
        "settings": {
            "width": 600,
            "background": "#eeeeee",
            "font_family": "Arial, Helvetica, sans-serif",
            "text_color": "#222222",
            "link_color": "#0055aa",
            "preheader": "Your {{ contact.attributes.plan }} news",
        },
        "sections": [
            {
                "columns": [
                    {
                        "blocks": [
                            {
                                "type": "hero",
                                "background_image": f"{IMG}/hero.png",
                                "heading": "Hello, {{ contact.name }}",
                                "text": "Spring is here",
                                "button": {"text": "See more", "href": "https://shop.test/spring"},
                            }
                        ]
                    }
                ]
            },
            {
                "columns": [
                    {
                        "width": 50,
                        "blocks": [
                            {
                                "type": "text",
                                "html": "<p>Dear {{ contact.name }}, <b>thanks</b> for "
                                '<a href="https://shop.test/orders">your order</a>.</p>',
                            },
                            {
                                "type": "image",
                                "src": f"{IMG}/product.png",
                                "alt": "Product photo",
                                "href": "https://shop.test/p/42",
                            },
                        ],
                    },
                    {
                        "width": 50,
                        "blocks": [
                            {
                                "type": "button",
                                "text": "Buy now",
                                "href": "https://shop.test/p/{{ contact.attributes.sku }}",
                                "background_color": "#cc3300",
                            },
                            {"type": "divider", "color": "#999999", "thickness": 2},
                            {"type": "spacer", "height": 40},
                            {"type": "image", "src": f"{IMG}/decor.png"},
                        ],
                    },
                ]
            },
            {
                "columns": [
                    {
                        "blocks": [
                            {
                                "type": "variable",
                                "name": "contact.attributes.city",
                                "default": "your town",
                            },
                            {
                                "type": "condition",
                                "test": "contact.attributes.plan == 'pro'",
                                "blocks": [{"type": "text", "html": "<p>Pro member</p>"}],
                                "else_blocks": [{"type": "text", "html": "<p>Go pro</p>"}],
                            },
                            {
                                "type": "loop",
                                "item": "order",
                                "over": "contact.attributes.orders",
                                "blocks": [
                                    {
                                        "type": "variable",
                                        "name": "order.title",
                                        "default": "an order",
                                    }
                                ],
                            },
                            {
                                "type": "social",
                                "links": [
                                    {"network": "facebook", "href": "https://facebook.com/shop"},
                                    {"network": "x", "href": "https://x.com/shop"},
                                ],
                            },
                            {"type": "footer", "preferences": True},
                        ]
                    }
                ]
            },
        ],
    }


SAMPLE_CONTEXT: dict[str, Any] = {
    "contact": {
        "email": "ada@example.test",
        "name": "Ada",
        "attributes": {
            "plan": "pro",
            "sku": "42",
            "orders": [{"title": "Teapot"}, {"title": "Kettle"}, {"title": "Cups"}],
        },
    },
    "unsubscribe_url": "https://pw.example.test/u/abc",
    "preferences_url": "https://pw.example.test/p/abc",
    "view_online_url": "https://pw.example.test/v/abc",
    "postal_address": "1 Quay Street, Harbour Town",
}
