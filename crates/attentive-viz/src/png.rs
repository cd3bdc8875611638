//! PNG of a view, rendered in Rust from its SVG (resvg), text set in the system's fonts.

use crate::error::{Result, VizError};
use resvg::{tiny_skia, usvg};
use std::sync::{Arc, OnceLock};

/// The system's fonts, loaded once.
fn fonts() -> Arc<usvg::fontdb::Database> {
    static FONTS: OnceLock<Arc<usvg::fontdb::Database>> = OnceLock::new();
    FONTS
        .get_or_init(|| {
            let mut db = usvg::fontdb::Database::new();
            db.load_system_fonts();
            Arc::new(db)
        })
        .clone()
}

/// Whether any font was found: without one, a view's text would be missing from its PNG.
pub fn have_fonts() -> bool {
    !fonts().is_empty()
}

/// `svg` rendered at `scale` (2 for a crisp picture in a paper) as PNG bytes.
///
/// # Errors
/// [`VizError::Render`] when the SVG does not parse, the picture would be empty, or the system
/// has no font for its text (install one, e.g. Debian's `fonts-dejavu-core`).
pub fn png(svg: &str, scale: f32) -> Result<Vec<u8>> {
    let fail = |reason: String| VizError::Render(reason);
    if svg.contains("<text") && !have_fonts() {
        return Err(fail(
            "no font on this system for the view's text (install one, e.g. fonts-dejavu-core)"
                .into(),
        ));
    }
    let opt = usvg::Options {
        fontdb: fonts(),
        ..Default::default()
    };
    let tree = usvg::Tree::from_str(svg, &opt).map_err(|e| fail(e.to_string()))?;
    let size = tree
        .size()
        .to_int_size()
        .scale_by(scale)
        .ok_or_else(|| fail("empty picture".into()))?;
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| fail(format!("no pixmap of {}×{}", size.width(), size.height())))?;
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap.encode_png().map_err(|e| fail(e.to_string()))
}
