"""Theory side: component library, composition rules and companion results."""
