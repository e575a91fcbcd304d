//! The analytic checker: does an image show what a prompt says?
//!
//! The image is segmented by the palette, the connected regions of each colour become objects,
//! each object's shape is read off its mask, and the relation is tested on the objects'
//! centres. Dataset images segment exactly; the tolerances let a generated image that is a
//! little off-colour, soft-edged or speckled still be judged by what it shows.
//!
//! Pixel thresholds are for a 64×64 image and scale with the image's side (areas with its
//! square), so an upscaled image is judged the same way.

use image::RgbImage;
use serde_json::{Value, json};

use crate::prompt::{Colour, ObjectSpec, Prompt, Relation, Shape};
use crate::scene::{BACKGROUND, IMAGE_SIZE};

/// The largest Euclidean RGB distance at which a pixel still counts as its nearest palette
/// colour (or as the white background); farther pixels are "other".
///
/// The closest two palette colours (blue and purple) are 116 apart and every other pair (white
/// included) at least 160, so 60, about half the smallest gap, keeps the colours' catchments
/// all but apart (where two overlap, the nearer colour wins), while a rendering off by up to
/// ±30 in every channel (a distance of 52) still segments as its colour.
pub const COLOUR_TOLERANCE: u32 = 60;

/// Regions smaller than this (px, at 64×64) are specks and ignored: the smallest dataset
/// object, a 14 px triangle, covers 105 px, and a generated image's stray speckle rarely
/// reaches 20.
const MIN_OBJECT_AREA: f32 = 20.0;
/// The share of the image that must be white background at least. Dataset images are at least
/// 76% background (two 22 px squares); noise, black or a flood of colour are not.
const MIN_BACKGROUND_SHARE: f32 = 0.5;
/// How far (px, at 64×64) the first centre must be from the second in the named direction.
/// Half the dataset's 16 px, so a model's imprecise placement is not punished while a
/// side-by-side or reversed pair still fails.
const MIN_RELATION_OFFSET: f32 = 8.0;

/// What [`segment`] makes of a pixel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Label {
    /// Within [`COLOUR_TOLERANCE`] of white, and nearer white than any palette colour.
    Background,
    /// Within [`COLOUR_TOLERANCE`] of this colour, and nearest to it.
    Colour(Colour),
    /// Far from every palette colour and from white.
    Other,
}

/// Labels each pixel (row-major) by its nearest palette colour or the background, or
/// [`Label::Other`] when none is within [`COLOUR_TOLERANCE`].
pub fn segment(image: &RgbImage) -> Vec<Label> {
    // Plain indexing rather than iterator adaptors: this runs for every pixel of every checked
    // image, and the tests check thousands of images in the unoptimised dev profile.
    let raw = image.as_raw();
    let mut labels = Vec::with_capacity(raw.len() / 3);
    // Most pixels repeat the one before (the background, an object's fill): reuse its label.
    let mut last = None;
    let mut i = 0;
    while i + 3 <= raw.len() {
        let pixel = [raw[i], raw[i + 1], raw[i + 2]];
        let l = match last {
            Some((p, l)) if p == pixel => l,
            _ => label(pixel),
        };
        last = Some((pixel, l));
        labels.push(l);
        i += 3;
    }
    labels
}

/// The background and the palette, as [`label`] compares pixels against them.
const PALETTE: [(Label, [u8; 3]); 6] = [
    (Label::Background, BACKGROUND),
    (Label::Colour(Colour::Red), Colour::Red.rgb()),
    (Label::Colour(Colour::Yellow), Colour::Yellow.rgb()),
    (Label::Colour(Colour::Green), Colour::Green.rgb()),
    (Label::Colour(Colour::Blue), Colour::Blue.rgb()),
    (Label::Colour(Colour::Purple), Colour::Purple.rgb()),
];

fn label(pixel: [u8; 3]) -> Label {
    let [r, g, b] = pixel.map(i32::from);
    let (mut nearest, mut nearest_d) = (Label::Other, i32::MAX);
    for &(label, [cr, cg, cb]) in &PALETTE {
        let (dr, dg, db) = (r - i32::from(cr), g - i32::from(cg), b - i32::from(cb));
        let d = dr * dr + dg * dg + db * db;
        if d < nearest_d {
            (nearest, nearest_d) = (label, d);
        }
    }
    let tolerance = COLOUR_TOLERANCE as i32;
    if nearest_d <= tolerance * tolerance {
        nearest
    } else {
        Label::Other
    }
}

/// One object found in an image: a connected region of one palette colour.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Detection {
    /// The palette colour of the region.
    pub colour: Colour,
    /// Pixels in the region.
    pub area: u32,
    /// The region's bounding box: `left`, `top`, `width`, `height`.
    pub bbox: [u32; 4],
    /// `area` over the bounding box's area: a square ≈ 1, a circle ≈ π/4, a triangle ≈ ½.
    pub fill: f32,
    /// The share of the area above the box's horizontal midline: ≈ ½ for a circle or square,
    /// ≈ ¼ for a triangle with its apex up.
    pub top_share: f32,
    /// The share of the corners of the region's body's box (the pixels whose centres lie
    /// outside the ellipse inscribed in the box) that the body covers: 1 for a square, 0 for a
    /// circle. The body is the region's opening by a 3 × 3 square (at 64 × 64): the region
    /// less any fringe one pixel thin.
    pub corner_share: f32,
    /// The shape the mask reads as, if any.
    pub shape: Option<Shape>,
}

impl Detection {
    /// The centre of the bounding box, `(x, y)` (the dataset places objects by box centres).
    pub fn centre(&self) -> (f32, f32) {
        let [left, top, width, height] = self.bbox.map(|v| v as f32);
        (left + width / 2.0, top + height / 2.0)
    }

    fn describe(&self) -> String {
        let (x, y) = self.centre();
        let what = match self.shape {
            Some(shape) => format!("a {} {shape}", self.colour),
            None => format!(
                "a {} region of no known shape (fill {:.2}, {:.0}% above its middle, corners \
                 {:.0}% covered)",
                self.colour,
                self.fill,
                self.top_share * 100.0,
                self.corner_share * 100.0
            ),
        };
        format!("{what} at ({x:.1}, {y:.1})")
    }

    fn to_json(self) -> Value {
        let (x, y) = self.centre();
        json!({
            "colour": self.colour.name(),
            "shape": self.shape.map(Shape::name),
            "area": self.area,
            "bbox": self.bbox,
            "centre": [x, y],
            "fill": self.fill,
            "top_share": self.top_share,
            "corner_share": self.corner_share,
        })
    }
}

/// What the image holds: its significant palette objects, and how many significant regions of
/// no palette colour stand apart from them.
struct Analysis {
    objects: Vec<Detection>,
    stray: usize,
}

/// The share of `labels` that is background.
fn background_share(labels: &[Label]) -> f32 {
    let background = labels.iter().filter(|&&l| l == Label::Background).count();
    background as f32 / labels.len().max(1) as f32
}

/// Finds the objects in an image segmented as `labels`.
fn analyse(image: &RgbImage, labels: &[Label]) -> Analysis {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let scale = image.width().min(image.height()) as f32 / IMAGE_SIZE as f32;
    let min_area = (MIN_OBJECT_AREA * scale * scale).round().max(1.0) as usize;

    // 8-connected regions of equal non-background labels: a soft or slightly broken diagonal
    // edge keeps an object in one piece.
    const NONE: usize = usize::MAX;
    let mut region = vec![NONE; w * h];
    let mut regions: Vec<(Label, Vec<usize>)> = Vec::new();
    for start in 0..w * h {
        if labels[start] == Label::Background || region[start] != NONE {
            continue;
        }
        let id = regions.len();
        let mut pixels = vec![start];
        region[start] = id;
        let mut next = 0;
        while next < pixels.len() {
            let p = pixels[next];
            next += 1;
            for offset in AROUND {
                if let Some(n) = neighbour(p, offset, w, h)
                    && region[n] == NONE
                    && labels[n] == labels[start]
                {
                    region[n] = id;
                    pixels.push(n);
                }
            }
        }
        regions.push((labels[start], pixels));
    }

    let significant = |id: usize| regions[id].1.len() >= min_area;
    let mut objects = Vec::new();
    let mut stray = 0;
    for (id, (label, pixels)) in regions.iter().enumerate() {
        if !significant(id) {
            continue;
        }
        match *label {
            Label::Colour(colour) => objects.push(measure(colour, pixels, w, scale)),
            // A rim of in-between colours around an object (a soft edge) is part of it; a
            // region of another colour on its own is an object the prompt does not name.
            Label::Other => {
                let touches_object = pixels.iter().any(|&p| {
                    AROUND.iter().any(|&offset| {
                        neighbour(p, offset, w, h).is_some_and(|n| {
                            let r = region[n];
                            r != NONE
                                && r != id
                                && matches!(regions[r].0, Label::Colour(_))
                                && significant(r)
                        })
                    })
                });
                stray += usize::from(!touches_object);
            }
            Label::Background => {}
        }
    }
    Analysis { objects, stray }
}

/// The offsets of a pixel's 8 neighbours.
const AROUND: [(isize, isize); 8] = [
    (-1, -1),
    (0, -1),
    (1, -1),
    (-1, 0),
    (1, 0),
    (-1, 1),
    (0, 1),
    (1, 1),
];

/// The index of pixel `p`'s neighbour at `offset` in a `w × h` image, if inside it.
fn neighbour(p: usize, offset: (isize, isize), w: usize, h: usize) -> Option<usize> {
    let x = (p % w).checked_add_signed(offset.0)?;
    let y = (p / w).checked_add_signed(offset.1)?;
    (x < w && y < h).then_some(y * w + x)
}

fn measure(colour: Colour, pixels: &[usize], w: usize, scale: f32) -> Detection {
    let (left, right) = min_max(pixels.iter().map(|p| p % w));
    let (top, bottom) = min_max(pixels.iter().map(|p| p / w));
    let (width, height) = (right - left + 1, bottom - top + 1);
    // The corners are read from the region's opening: a one-pixel fringe (a partial row of
    // stray pixels along a side, as a model draws them) would widen the box they are read
    // against. A thin region the opening all but removes is read as it is.
    let local: Vec<(usize, usize)> = pixels.iter().map(|p| (p % w - left, p / w - top)).collect();
    let radius = scale.round().max(1.0) as usize;
    let opened = opening(&local, width, height, radius);
    let body = if 2 * opened.len() >= local.len() {
        &opened
    } else {
        &local
    };
    let mut form = Form::of(&local);
    // Only the corners: the opening cuts a triangle's apex off.
    form.corner_share = Form::of(body).corner_share;
    Detection {
        colour,
        area: pixels.len() as u32,
        bbox: [left as u32, top as u32, width as u32, height as u32],
        fill: form.fill,
        top_share: form.top_share,
        corner_share: form.corner_share,
        shape: form.classify(),
    }
}

/// The pixels of a `width × height` mask's morphological opening by a square of side
/// `2 radius + 1`: those a square of that size within the mask covers.
fn opening(
    pixels: &[(usize, usize)],
    width: usize,
    height: usize,
    radius: usize,
) -> Vec<(usize, usize)> {
    let mut mask = vec![false; width * height];
    for &(x, y) in pixels {
        mask[y * width + x] = true;
    }
    // Erosion: the centres of the squares that fit.
    let fits = |x: usize, y: usize| {
        x >= radius
            && y >= radius
            && x + radius < width
            && y + radius < height
            && (y - radius..=y + radius)
                .all(|y| (x - radius..=x + radius).all(|x| mask[y * width + x]))
    };
    let mut covered = vec![false; width * height];
    for y in 0..height {
        for x in 0..width {
            if fits(x, y) {
                for y in y - radius..=y + radius {
                    covered[y * width + x - radius..=y * width + x + radius].fill(true);
                }
            }
        }
    }
    pixels
        .iter()
        .copied()
        .filter(|&(x, y)| covered[y * width + x])
        .collect()
}

/// What a mask's shape is read from (pixel coordinates of any origin).
struct Form {
    width: usize,
    height: usize,
    fill: f32,
    top_share: f32,
    corner_share: f32,
}

impl Form {
    /// The form of a region's pixels (not empty: every region has one).
    fn of(pixels: &[(usize, usize)]) -> Self {
        debug_assert!(!pixels.is_empty());
        let (left, right) = min_max(pixels.iter().map(|p| p.0));
        let (top, bottom) = min_max(pixels.iter().map(|p| p.1));
        let (width, height) = (right - left + 1, bottom - top + 1);
        // Doubled coordinates: a pixel's centre row is 2y + 1, the box's midline
        // top + bottom + 1.
        let midline = top + bottom + 1;
        let above: f32 = pixels
            .iter()
            .map(|&(_, y)| match (2 * y + 1).cmp(&midline) {
                std::cmp::Ordering::Less => 1.0,
                std::cmp::Ordering::Equal => 0.5,
                std::cmp::Ordering::Greater => 0.0,
            })
            .sum();
        let area = pixels.len() as f32;
        // Doubled coordinates again: the box's centre is (left + right + 1, top + bottom + 1),
        // a pixel's (2x + 1, 2y + 1), the inscribed ellipse's semi-axes the box's width and
        // height.
        let (cx, cy) = ((left + right + 1) as f32, (top + bottom + 1) as f32);
        let outside = |x: usize, y: usize| {
            let u = ((2 * x + 1) as f32 - cx) / width as f32;
            let v = ((2 * y + 1) as f32 - cy) / height as f32;
            u * u + v * v > 1.0
        };
        let corners = (top..=bottom)
            .flat_map(|y| (left..=right).map(move |x| (x, y)))
            .filter(|&(x, y)| outside(x, y))
            .count();
        let covered = pixels.iter().filter(|&&(x, y)| outside(x, y)).count();
        Self {
            width,
            height,
            fill: area / (width * height) as f32,
            top_share: above / area.max(1.0),
            corner_share: covered as f32 / corners.max(1) as f32,
        }
    }

    /// Reads a mask's shape from its box's proportions, its fill, its top share and its corners.
    ///
    /// The thresholds sit midway between the shapes' values (top share 0.5 / 0.5 / 0.25; corners
    /// 1 / 0 for a square / circle) with room for the pixel grid (small rendered shapes fill a
    /// little more: a 14 px triangle 0.57, circles of 12 to 19 px 0.78 to 0.81) and for a
    /// generated image's soft edges.
    ///
    /// A square and a circle are told apart by their corners, not by their fill (1 against
    /// 0.785): a square drawn with a ragged rim (a partial row of stray pixels along a side, a
    /// notch at a corner, as a model draws them) has a box a pixel or two larger than its body
    /// and fills it 0.85 to 0.89, as a circle might, while the corners of its body stay
    /// covered. On the built-in VAE's reconstructions of 800 dataset images (diffusers, f32),
    /// reading squares by a fill of 0.89 passed 784 images (15 squares read as circles); by the
    /// corners of the opening, 798 (one square read as a circle); neither read a circle as a
    /// square.
    fn classify(&self) -> Option<Shape> {
        let (fill, top_share, corner_share) = (self.fill, self.top_share, self.corner_share);
        // Every shape's box is square; a long thin region is none of them.
        let aspect = self.width as f32 / self.height as f32;
        if !(0.75..=1.0 / 0.75).contains(&aspect) {
            return None;
        }
        if top_share < 0.4 {
            // Apex up: most of the area in the lower half.
            return (0.35..0.7).contains(&fill).then_some(Shape::Triangle);
        }
        if top_share > 0.6 {
            // Upside down, or a blob: not a shape of the dataset.
            return None;
        }
        // A square's body fills its box all but a rim (a ring or a cross covers the corners
        // without); a circle's fills it π/4 (a crescent or a ring does not).
        if corner_share >= 0.5 {
            (fill >= 0.75).then_some(Shape::Square)
        } else {
            (fill >= 0.64).then_some(Shape::Circle)
        }
    }
}

fn min_max(values: impl Iterator<Item = usize>) -> (usize, usize) {
    values.fold((usize::MAX, 0), |(lo, hi), v| (lo.min(v), hi.max(v)))
}

/// The objects [`check`] finds in an image: each connected region (8-neighbour) of one palette
/// colour of at least 20 px (at 64×64), in scan order of their first pixel.
pub fn detect(image: &RgbImage) -> Vec<Detection> {
    analyse(image, &segment(image)).objects
}

/// The first thing wrong with an image that fails [`check`], in the order the checker looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// The prompt is outside the dataset's grammar, or the image is empty.
    Input,
    /// Less than half of the image is white background (noise, black, a flood of colour).
    Background,
    /// An object in no palette colour.
    Stray,
    /// Not exactly one object of each named colour and nothing else.
    Objects,
    /// The named colours are there, one of them in the wrong shape.
    Shape,
    /// The right objects, in the opposite relation (`a above b` drawn as `a below b`): the
    /// words are followed and their order is not.
    Reversed,
    /// The right objects, in neither the named relation nor its opposite (too close, or
    /// further apart across the axis than along it).
    Placement,
}

impl Failure {
    /// Every kind, in the checker's order.
    pub const ALL: [Failure; 7] = [
        Failure::Input,
        Failure::Background,
        Failure::Stray,
        Failure::Objects,
        Failure::Shape,
        Failure::Reversed,
        Failure::Placement,
    ];

    /// Its name in reports (`input`, `background`, `stray`, `objects`, `shape`, `reversed`,
    /// `placement`).
    pub fn name(self) -> &'static str {
        match self {
            Failure::Input => "input",
            Failure::Background => "background",
            Failure::Stray => "stray",
            Failure::Objects => "objects",
            Failure::Shape => "shape",
            Failure::Reversed => "reversed",
            Failure::Placement => "placement",
        }
    }
}

/// The checker's judgement of an image against a prompt.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// Whether the image shows exactly what the prompt says.
    pub pass: bool,
    /// What kind of mistake it makes, for an image that fails.
    pub failure: Option<Failure>,
    /// Why: what was found, or the first thing that is wrong.
    pub reason: String,
    /// The objects found.
    pub objects: Vec<Detection>,
}

impl Verdict {
    /// The verdict as JSON (`pass`, `failure`, `reason`, `objects` with their measurements),
    /// for logs.
    pub fn to_json(&self) -> Value {
        json!({
            "pass": self.pass,
            "failure": self.failure.map(Failure::name),
            "reason": self.reason,
            "objects": self.objects.iter().map(|d| d.to_json()).collect::<Vec<_>>(),
        })
    }
}

/// Judges whether `image` shows `prompt`: exactly the objects the prompt names (each colour
/// once, no other object of significant size, in a palette colour or not), each of the named
/// shape, and for two objects their centres in the named relation (at least 8 px apart that
/// way at 64×64, and more apart that way than across). At least half of the image must be
/// white background.
///
/// A prompt outside the dataset's grammar fails, with the reason.
pub fn check(image: &RgbImage, prompt: &str) -> Verdict {
    let prompt = match prompt.parse::<Prompt>() {
        Ok(prompt) => prompt,
        Err(e) => return failed(Failure::Input, e.to_string(), Vec::new()),
    };
    if image.width() == 0 || image.height() == 0 {
        return failed(Failure::Input, "the image is empty".into(), Vec::new());
    }
    let labels = segment(image);
    // First, as it is cheap and decides noise, black and floods of colour outright (no objects
    // are looked for then).
    let background = background_share(&labels);
    if background < MIN_BACKGROUND_SHARE {
        let reason = format!(
            "the background is not white: {:.0}% of the pixels are (at least {:.0}% must be)",
            background * 100.0,
            MIN_BACKGROUND_SHARE * 100.0
        );
        return failed(Failure::Background, reason, Vec::new());
    }
    let analysis = analyse(image, &labels);
    let objects = analysis.objects;
    if analysis.stray > 0 {
        let reason = format!("found {} object(s) in no palette colour", analysis.stray);
        return failed(Failure::Stray, reason, objects);
    }

    // Each named colour exactly once and nothing else (the prompt's colours differ).
    let named = prompt.objects();
    let found: Option<Vec<&Detection>> = named
        .iter()
        .map(|spec| {
            let mut of_colour = objects.iter().filter(|d| d.colour == spec.colour);
            match (of_colour.next(), of_colour.next()) {
                (Some(d), None) => Some(d),
                _ => None,
            }
        })
        .collect();
    let found = match found {
        Some(found) if objects.len() == named.len() => found,
        _ => {
            let list = |v: Vec<String>| v.join(", ");
            let reason = format!(
                "expected {}; found {} object(s){}{}",
                list(named.iter().map(ObjectSpec::to_string).collect()),
                objects.len(),
                if objects.is_empty() { "" } else { ": " },
                list(objects.iter().map(Detection::describe).collect()),
            );
            return failed(Failure::Objects, reason, objects);
        }
    };

    for (spec, detection) in named.iter().zip(&found) {
        if detection.shape != Some(spec.shape) {
            let reason = format!("expected {spec}; found {}", detection.describe());
            return failed(Failure::Shape, reason, objects);
        }
    }

    if let Prompt::Two(a, relation, b) = prompt {
        let scale = image.width().min(image.height()) as f32 / IMAGE_SIZE as f32;
        let margin = MIN_RELATION_OFFSET * scale;
        let (along, across) = offsets(found[0].centre(), relation, found[1].centre());
        if along < margin || along <= across.abs() {
            let reason = format!(
                "the {} {} is not {relation} the {} {}: its centre is {along:.1} px {relation} \
                 the other's (at least {margin:.1} needed) and {:.1} px off across",
                a.colour,
                a.shape,
                b.colour,
                b.shape,
                across.abs(),
            );
            // The opposite relation would pass: the same test read the other way.
            let kind = if -along >= margin && -along > across.abs() {
                Failure::Reversed
            } else {
                Failure::Placement
            };
            return failed(kind, reason, objects);
        }
    }
    Verdict {
        pass: true,
        failure: None,
        reason: format!("found {prompt}"),
        objects,
    }
}

/// How far `first` lies from `second` in the relation's direction (negative: the other way),
/// and how far across it (signed).
fn offsets(first: (f32, f32), relation: Relation, second: (f32, f32)) -> (f32, f32) {
    let (dx, dy) = (second.0 - first.0, second.1 - first.1);
    match relation {
        Relation::Above => (dy, dx),
        Relation::Below => (-dy, dx),
        Relation::LeftOf => (dx, dy),
        Relation::RightOf => (-dx, dy),
    }
}

fn failed(failure: Failure, reason: String, objects: Vec<Detection>) -> Verdict {
    Verdict {
        pass: false,
        failure: Some(failure),
        reason,
        objects,
    }
}

#[cfg(test)]
mod tests {
    use image::{Rgb, imageops};
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;
    use crate::scene::{HeldOut, Object, Scene, random_scene};

    /// Two-object scenes of every kind (held-out ones included: evaluation checks those).
    fn pairs(count: usize, seed: u64) -> Vec<Scene> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut scenes = Vec::new();
        while scenes.len() < count {
            let scene = random_scene(&mut rng, HeldOut::Include);
            if scene.relation().is_some() {
                scenes.push(scene);
            }
        }
        scenes
    }

    fn fails(image: &RgbImage, prompt: &str) {
        let verdict = check(image, prompt);
        assert!(!verdict.pass, "{prompt:?} passed: {}", verdict.reason);
        assert!(verdict.failure.is_some());
    }

    fn fails_with(image: &RgbImage, prompt: &str, kind: Failure) {
        let verdict = check(image, prompt);
        assert_eq!(
            verdict.failure,
            Some(kind),
            "{prompt:?}: {}",
            verdict.reason
        );
        assert!(!verdict.pass);
    }

    /// Every rendered shape of every size reads as itself, with room to spare.
    #[test]
    fn rendered_shapes_classify_with_margin() {
        for size in 10..=40 {
            for shape in Shape::ALL {
                let object = Object {
                    colour: Colour::Green,
                    shape,
                    left: 3,
                    top: 5,
                    size,
                };
                // Sizes outside the dataset's ranges too, so no `Scene`: paint it directly.
                let image = RgbImage::from_fn(64, 64, |x, y| {
                    Rgb(if object.covers(x, y) {
                        object.colour.rgb()
                    } else {
                        BACKGROUND
                    })
                });
                let found = detect(&image);
                assert_eq!(found.len(), 1);
                let d = found[0];
                assert_eq!(d.bbox, [3, 5, size, size], "{shape} {size}");
                assert_eq!(d.shape, Some(shape), "{shape} {size}: {d:?}");
                let (fill, top, corners) = (d.fill, d.top_share, d.corner_share);
                match shape {
                    Shape::Square => assert!(fill == 1.0 && top == 0.5 && corners == 1.0),
                    Shape::Circle => {
                        assert!((0.76..0.84).contains(&fill) && corners < 0.1, "{d:?}");
                    }
                    Shape::Triangle => {
                        assert!((0.5..=0.6).contains(&fill) && (0.2..0.33).contains(&top));
                    }
                }
            }
        }
    }

    #[test]
    fn dataset_images_pass_with_their_captions() {
        let mut rng = StdRng::seed_from_u64(21);
        for _ in 0..500 {
            let scene = random_scene(&mut rng, HeldOut::Include);
            let verdict = check(&scene.render(), &scene.caption());
            assert!(verdict.pass, "{}: {}", scene.caption(), verdict.reason);
            assert_eq!(verdict.objects.len(), scene.objects().len());
        }
    }

    #[test]
    fn blank_black_and_noise_fail_every_prompt() {
        let prompts: Vec<String> = Prompt::all().iter().map(Prompt::to_string).collect();
        let white = RgbImage::from_pixel(64, 64, Rgb([255, 255, 255]));
        let black = RgbImage::from_pixel(64, 64, Rgb([0, 0, 0]));
        for prompt in &prompts {
            fails_with(&white, prompt, Failure::Objects);
            fails_with(&black, prompt, Failure::Background);
        }
        let mut rng = StdRng::seed_from_u64(4);
        for i in 0..50 {
            let noise = RgbImage::from_fn(64, 64, |_, _| Rgb(rng.random()));
            for prompt in prompts.iter().skip(i).step_by(50) {
                fails(&noise, prompt);
            }
        }
    }

    #[test]
    fn other_relations_fail() {
        for scene in pairs(300, 5) {
            let image = scene.render();
            let Prompt::Two(a, relation, b) = scene.prompt() else {
                unreachable!()
            };
            for other in Relation::ALL.into_iter().filter(|&r| r != relation) {
                let kind = if other == relation.reversed() {
                    Failure::Reversed
                } else {
                    Failure::Placement
                };
                fails_with(&image, &Prompt::Two(a, other, b).to_string(), kind);
            }
            // The same relation read from the other object is the reverse, and true.
            let flipped = Prompt::Two(b, relation.reversed(), a).to_string();
            assert!(check(&image, &flipped).pass, "{flipped}");
        }
    }

    #[test]
    fn swapped_or_wrong_colours_and_shapes_fail() {
        for scene in pairs(300, 6) {
            let image = scene.render();
            let Prompt::Two(a, relation, b) = scene.prompt() else {
                unreachable!()
            };
            let (ca, cb) = (a.colour, b.colour);
            let swap_colours = Prompt::Two(
                ObjectSpec { colour: cb, ..a },
                relation,
                ObjectSpec { colour: ca, ..b },
            );
            // Each colour on the other's shape: with two shapes alike, the scene reversed.
            let kind = if a.shape == b.shape {
                Failure::Reversed
            } else {
                Failure::Shape
            };
            fails_with(&image, &swap_colours.to_string(), kind);
            if a.shape != b.shape {
                let swap_shapes = Prompt::Two(
                    ObjectSpec {
                        shape: b.shape,
                        ..a
                    },
                    relation,
                    ObjectSpec {
                        shape: a.shape,
                        ..b
                    },
                );
                fails_with(&image, &swap_shapes.to_string(), Failure::Shape);
            }
            for colour in Colour::ALL.into_iter().filter(|&c| c != ca && c != cb) {
                fails_with(
                    &image,
                    &Prompt::Two(ObjectSpec { colour, ..a }, relation, b).to_string(),
                    Failure::Objects,
                );
                fails_with(
                    &image,
                    &Prompt::Two(a, relation, ObjectSpec { colour, ..b }).to_string(),
                    Failure::Objects,
                );
            }
            for shape in Shape::ALL.into_iter().filter(|&s| s != a.shape) {
                fails_with(
                    &image,
                    &Prompt::Two(ObjectSpec { shape, ..a }, relation, b).to_string(),
                    Failure::Shape,
                );
            }
            // Naming one of the two objects is not enough: the other is an extra object.
            fails_with(&image, &Prompt::One(a).to_string(), Failure::Objects);
            fails_with(&image, &Prompt::One(b).to_string(), Failure::Objects);
        }
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let scene = random_scene(&mut rng, HeldOut::Include);
            let Prompt::One(a) = scene.prompt() else {
                continue;
            };
            let image = scene.render();
            for colour in Colour::ALL.into_iter().filter(|&c| c != a.colour) {
                let prompt = Prompt::One(ObjectSpec { colour, ..a }).to_string();
                fails_with(&image, &prompt, Failure::Objects);
            }
            for shape in Shape::ALL.into_iter().filter(|&s| s != a.shape) {
                let prompt = Prompt::One(ObjectSpec { shape, ..a }).to_string();
                fails_with(&image, &prompt, Failure::Shape);
            }
            // One object is not two.
            let other = ObjectSpec {
                colour: if a.colour == Colour::Red {
                    Colour::Green
                } else {
                    Colour::Red
                },
                ..a
            };
            let prompt = Prompt::Two(a, Relation::Above, other).to_string();
            fails_with(&image, &prompt, Failure::Objects);
        }
    }

    #[test]
    fn an_upside_down_triangle_is_no_triangle() {
        let object = Object {
            colour: Colour::Purple,
            shape: Shape::Triangle,
            left: 10,
            top: 10,
            size: 24,
        };
        let image = Scene::one(object).unwrap().render();
        assert!(check(&image, "a purple triangle").pass);
        fails_with(
            &imageops::flip_vertical(&image),
            "a purple triangle",
            Failure::Shape,
        );
    }

    /// A generated image is not exact: colours a little off, soft edges, specks, other sizes.
    #[test]
    fn tolerates_what_generated_images_get_wrong() {
        let mut rng = StdRng::seed_from_u64(8);
        for _ in 0..200 {
            let scene = random_scene(&mut rng, HeldOut::Include);
            let caption = scene.caption();
            let exact = scene.render();

            // Every channel off by up to ±25.
            let mut off = exact.clone();
            for p in off.pixels_mut() {
                for c in &mut p.0 {
                    *c = (i32::from(*c) + rng.random_range(-25..=25)).clamp(0, 255) as u8;
                }
            }
            let v = check(&off, &caption);
            assert!(v.pass, "off-colour {caption}: {}", v.reason);

            // Soft edges: a 3×3 box blur mixes each edge with the background.
            let blurred = RgbImage::from_fn(64, 64, |x, y| {
                let p = (y * 64 + x) as usize;
                let (mut sum, mut n) = ([0u32; 3], 0);
                for q in AROUND
                    .iter()
                    .filter_map(|&o| neighbour(p, o, 64, 64))
                    .chain([p])
                {
                    let c = exact.get_pixel((q % 64) as u32, (q / 64) as u32).0;
                    for i in 0..3 {
                        sum[i] += u32::from(c[i]);
                    }
                    n += 1;
                }
                Rgb(sum.map(|s| (s / n) as u8))
            });
            let v = check(&blurred, &caption);
            assert!(v.pass, "blurred {caption}: {}", v.reason);

            // A speck of another colour is ignored.
            let mut specked = exact.clone();
            let (x, y) = (rng.random_range(0..61), rng.random_range(0..61));
            if (x..x + 3).all(|x| (y..y + 3).all(|y| specked.get_pixel(x, y).0 == BACKGROUND)) {
                for (dx, dy) in [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)] {
                    specked.put_pixel(x + dx, y + dy, Rgb([0, 0, 0]));
                }
                let v = check(&specked, &caption);
                assert!(v.pass, "specked {caption}: {}", v.reason);
            }

            // Twice the size.
            let big = imageops::resize(&exact, 128, 128, imageops::FilterType::Nearest);
            let v = check(&big, &caption);
            assert!(v.pass, "upscaled {caption}: {}", v.reason);
        }
    }

    /// A model draws an object with a ragged rim: pixels missing from its edge, stray ones
    /// beside it (a partial row above a square makes its box a pixel taller). Shapes read by
    /// their corners survive it where a fill threshold does not.
    #[test]
    fn ragged_edges_keep_their_shapes() {
        let mut rng = StdRng::seed_from_u64(13);
        let (mut images, mut passed, mut low_fill_squares) = (0, 0, 0);
        let mut failures = Vec::new();
        while images < 300 {
            let scene = random_scene(&mut rng, HeldOut::Include);
            let exact = scene.render();
            let is_background = |x: i64, y: i64| {
                !(0..64).contains(&x)
                    || !(0..64).contains(&y)
                    || exact.get_pixel(x as u32, y as u32).0 == BACKGROUND
            };
            let mut ragged = exact.clone();
            for (x, y, pixel) in exact.enumerate_pixels() {
                let (x, y) = (i64::from(x), i64::from(y));
                let sides = [(x - 1, y), (x + 1, y), (x, y - 1), (x, y + 1)];
                if pixel.0 != BACKGROUND {
                    // An edge pixel lost to the background.
                    if sides.iter().any(|&(x, y)| is_background(x, y)) && rng.random_bool(0.2) {
                        ragged.put_pixel(x as u32, y as u32, Rgb(BACKGROUND));
                    }
                } else if let Some(&(nx, ny)) = sides.iter().find(|&&(x, y)| !is_background(x, y))
                    && rng.random_bool(0.05)
                {
                    // A stray pixel of the object's colour beside it.
                    let colour = *exact.get_pixel(nx as u32, ny as u32);
                    ragged.put_pixel(x as u32, y as u32, colour);
                }
            }
            let caption = scene.caption();
            let verdict = check(&ragged, &caption);
            if verdict.pass {
                passed += 1;
            } else {
                failures.push(format!("{caption}: {}", verdict.reason));
            }
            for (found, object) in verdict.objects.iter().filter_map(|found| {
                let object = scene.objects().iter().find(|o| o.colour == found.colour)?;
                Some((found, object))
            }) {
                low_fill_squares += usize::from(object.shape == Shape::Square && found.fill < 0.89);
                // Neither shape is ever taken for the other.
                let swapped = matches!(
                    (object.shape, found.shape),
                    (Shape::Square, Some(Shape::Circle)) | (Shape::Circle, Some(Shape::Square))
                );
                assert!(!swapped, "{caption}: {found:?}");
            }
            images += 1;
        }
        // Some rims are too torn for any reading (a circle left filling less than 0.64 of its
        // box), but few; and they are ragged enough that a fill threshold midway between a
        // square's and a circle's (0.89) would call many squares circles.
        assert!(passed >= 294, "{passed} / 300: {failures:#?}");
        assert!(low_fill_squares >= 50, "{low_fill_squares}");
    }

    #[test]
    fn stray_and_unreadable_fail() {
        let object = Object {
            colour: Colour::Red,
            shape: Shape::Square,
            left: 2,
            top: 2,
            size: 20,
        };
        let mut image = Scene::one(object).unwrap().render();
        assert!(check(&image, "a red square").pass);
        fails_with(&image, "a red hexagon", Failure::Input);
        // A black 8×8 square far from the red one is an object the prompt does not name.
        for y in 40..48 {
            for x in 40..48 {
                image.put_pixel(x, y, Rgb([0, 0, 0]));
            }
        }
        let v = check(&image, "a red square");
        assert!(
            !v.pass && v.reason.contains("no palette colour"),
            "{}",
            v.reason
        );
        assert!(!check(&RgbImage::new(0, 0), "a red square").pass);
        assert_eq!(v.to_json()["objects"][0]["shape"], "square");
    }
}
