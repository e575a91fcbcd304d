//! Scenes: objects placed by the dataset's conventions, their captions, their rendering, and
//! random scenes that respect (or probe) the held-out combinations.

use std::ops::RangeInclusive;

use image::{Rgb, RgbImage};
use rand::{Rng, RngExt};

use crate::error::{Result, ShapesError};
use crate::prompt::{Colour, ObjectSpec, Prompt, Relation, Shape};

/// The side of every image, in pixels.
pub const IMAGE_SIZE: u32 = 64;
/// The background colour: white.
pub const BACKGROUND: [u8; 3] = [255, 255, 255];
/// The sizes (bounding-box sides) of a lone object.
pub const ONE_OBJECT_SIZES: RangeInclusive<u32> = 20..=30;
/// The sizes of each object of a pair.
pub const TWO_OBJECT_SIZES: RangeInclusive<u32> = 14..=22;
/// How far apart (px) the two centres are at least, along the relation's axis.
pub const MIN_ALONG: u32 = 16;
/// How far apart (px) the two centres are at most, across the relation's axis.
pub const MAX_ACROSS: u32 = 6;
/// The blank pixels between the two bounding boxes at least, along the relation's axis: a gap
/// keeps the objects separate components even where they would touch diagonally.
pub const MIN_GAP: u32 = 2;
/// The share of one-object scenes that [`random_scene`] draws (the rest have two).
pub const ONE_OBJECT_FRACTION: f64 = 0.4;

/// One placed object: a colour, a shape, and its square bounding box (`left`, `top`, `size`,
/// in pixels; it covers columns `left..left + size` and rows `top..top + size`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Object {
    /// The fill colour.
    pub colour: Colour,
    /// The shape.
    pub shape: Shape,
    /// The bounding box's first column, in pixels.
    pub left: u32,
    /// The bounding box's first row, in pixels.
    pub top: u32,
    /// The side of the square bounding box, in pixels.
    pub size: u32,
}

impl Object {
    /// The centre of the bounding box, `(x, y)`, in continuous image coordinates (pixel `i`
    /// spans `[i, i + 1)`), so an odd size has a half-pixel centre.
    pub fn centre(&self) -> (f32, f32) {
        let half = self.size as f32 / 2.0;
        (self.left as f32 + half, self.top as f32 + half)
    }

    /// The colour and shape, as a caption names them.
    pub fn spec(&self) -> ObjectSpec {
        ObjectSpec {
            colour: self.colour,
            shape: self.shape,
        }
    }

    /// Whether the object paints pixel `(x, y)`: the pixel's centre lies inside the shape.
    ///
    /// Computed in doubled integer coordinates (pixel centres at odd values, the box from 0 to
    /// `2 * size`), so the rendering is exact and identical everywhere.
    pub fn covers(&self, x: u32, y: u32) -> bool {
        if x < self.left || y < self.top || x >= self.left + self.size || y >= self.top + self.size
        {
            return false;
        }
        let s = i64::from(self.size);
        let u = 2 * i64::from(x - self.left) + 1 - s; // from the vertical axis, doubled
        let v = 2 * i64::from(y - self.top) + 1 - s; // from the horizontal axis, doubled
        match self.shape {
            Shape::Square => true,
            // Inside the inscribed circle (radius `size / 2`, doubled: `s`).
            Shape::Circle => u * u + v * v <= s * s,
            // The half-width at depth `d` below the apex is `d / 2`; taking it at the pixel's
            // lower edge (depth `row + 1`) puts one or two pixels in the top row and the full
            // width in the bottom row, so the bounding box is exactly `size` square.
            Shape::Triangle => u.abs() <= i64::from(y - self.top) + 1,
        }
    }

    /// Whether the box lies fully inside the image.
    fn is_inside(&self) -> bool {
        self.size > 0 && self.left + self.size <= IMAGE_SIZE && self.top + self.size <= IMAGE_SIZE
    }

    /// Start and doubled centre along the x or y axis.
    fn span(&self, vertical: bool) -> (i64, i64) {
        let start = i64::from(if vertical { self.top } else { self.left });
        (start, 2 * start + i64::from(self.size))
    }
}

/// An image's content: one object, or two of different colours in a relation. Only the
/// constructors make scenes, so every scene keeps the dataset's conventions (sizes, placement,
/// separation).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Scene {
    objects: Vec<Object>,
    relation: Option<Relation>,
}

impl Scene {
    /// A one-object scene: the size in [`ONE_OBJECT_SIZES`], the box inside the image.
    pub fn one(object: Object) -> Result<Scene> {
        if !ONE_OBJECT_SIZES.contains(&object.size) {
            return Err(ShapesError::Scene(
                "a lone object's size must be 20 to 30 px",
            ));
        }
        if !object.is_inside() {
            return Err(ShapesError::Scene(
                "the object must lie fully inside the image",
            ));
        }
        Ok(Scene {
            objects: vec![object],
            relation: None,
        })
    }

    /// A two-object scene: `first` is `relation` `second` (e.g. above it). Both sizes in
    /// [`TWO_OBJECT_SIZES`], different colours, both inside the image, the centres at least
    /// [`MIN_ALONG`] px apart along the relation's axis in its direction and at most
    /// [`MAX_ACROSS`] px apart across it, and the boxes [`MIN_GAP`] px apart.
    pub fn two(first: Object, relation: Relation, second: Object) -> Result<Scene> {
        if let Some(problem) = two_problem(&first, relation, &second) {
            return Err(ShapesError::Scene(problem));
        }
        Ok(Scene {
            objects: vec![first, second],
            relation: Some(relation),
        })
    }

    /// The objects, in caption order.
    pub fn objects(&self) -> &[Object] {
        &self.objects
    }

    /// The relation of a two-object scene.
    pub fn relation(&self) -> Option<Relation> {
        self.relation
    }

    /// What the caption says.
    pub fn prompt(&self) -> Prompt {
        match (self.objects.as_slice(), self.relation) {
            ([a, b], Some(relation)) => Prompt::Two(a.spec(), relation, b.spec()),
            // The constructors make no other shape of scene.
            _ => Prompt::One(self.objects[0].spec()),
        }
    }

    /// The caption: `a {colour} {shape}` or `a {colour} {shape} {relation} a {colour} {shape}`.
    pub fn caption(&self) -> String {
        self.prompt().to_string()
    }

    /// The image: [`IMAGE_SIZE`] square, white, each object an exact palette fill with hard
    /// edges (no antialiasing, so every pixel is the background or a palette colour).
    pub fn render(&self) -> RgbImage {
        let mut image = RgbImage::from_pixel(IMAGE_SIZE, IMAGE_SIZE, Rgb(BACKGROUND));
        for object in &self.objects {
            let fill = Rgb(object.colour.rgb());
            for y in object.top..object.top + object.size {
                for x in object.left..object.left + object.size {
                    if object.covers(x, y) {
                        image.put_pixel(x, y, fill);
                    }
                }
            }
        }
        image
    }
}

/// What is wrong with a two-object placement, if anything (no allocation: placement tries many).
fn two_problem(first: &Object, relation: Relation, second: &Object) -> Option<&'static str> {
    if first.colour == second.colour {
        return Some("the two objects must have different colours");
    }
    if !TWO_OBJECT_SIZES.contains(&first.size) || !TWO_OBJECT_SIZES.contains(&second.size) {
        return Some("each of two objects must be 14 to 22 px");
    }
    if !first.is_inside() || !second.is_inside() {
        return Some("the objects must lie fully inside the image");
    }
    let vertical = relation.is_vertical();
    // `a` is the object at the smaller coordinate along the axis, `b` the one after it.
    let (a, b) = if relation.second_is_after() {
        (first, second)
    } else {
        (second, first)
    };
    let ((a_start, a_centre), (b_start, b_centre)) = (a.span(vertical), b.span(vertical));
    if b_centre - a_centre < 2 * i64::from(MIN_ALONG) {
        return Some("the centres must be at least 16 px apart along the relation's axis");
    }
    let (across_a, across_b) = (a.span(!vertical).1, b.span(!vertical).1);
    if (across_b - across_a).abs() > 2 * i64::from(MAX_ACROSS) {
        return Some("the centres must be at most 6 px apart across the relation's axis");
    }
    if b_start - (a_start + i64::from(a.size)) < i64::from(MIN_GAP) {
        return Some("the boxes must be at least 2 px apart");
    }
    None
}

/// Which scenes [`random_scene`] may draw, by [`Prompt::is_held_out`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeldOut {
    /// Only combinations training may see: what the dataset is made of.
    Exclude,
    /// Only held-out combinations: scenes to evaluate composition with.
    Only,
    /// Any combination.
    Include,
}

impl HeldOut {
    fn allows(self, prompt: &Prompt) -> bool {
        match self {
            HeldOut::Exclude => !prompt.is_held_out(),
            HeldOut::Only => prompt.is_held_out(),
            HeldOut::Include => true,
        }
    }
}

/// Whether the scene shows a combination held out of training ([`Prompt::is_held_out`]).
pub fn is_held_out(scene: &Scene) -> bool {
    scene.prompt().is_held_out()
}

/// A random caption the policy allows: one object with probability [`ONE_OBJECT_FRACTION`],
/// else two of different colours; colours, shapes and relation uniform among those allowed.
///
/// The number of objects is drawn first and only the rest is redrawn when the policy refuses
/// it, so the one/two mix stays [`ONE_OBJECT_FRACTION`] whatever the policy.
pub fn random_prompt<R: Rng + ?Sized>(rng: &mut R, held_out: HeldOut) -> Prompt {
    // Every policy accepts some prompts of either kind (there are two held-out single
    // objects), so this ends.
    random_prompt_of(rng, &Colour::ALL, |prompt| held_out.allows(prompt))
}

/// A random scene with at least one colour outside the palette ([`Colour::EXTRA`]), drawn as
/// [`random_scene`] draws with the ten colours, held-out combinations excluded (a yellow
/// circle or a green triangle beside a teal square is still held out).
pub fn random_extra_colour_scene<R: Rng + ?Sized>(rng: &mut R) -> Scene {
    let colours: Vec<Colour> = Colour::ALL.into_iter().chain(Colour::EXTRA).collect();
    let prompt = random_prompt_of(rng, &colours, |prompt| {
        !prompt.is_held_out() && prompt.objects().iter().any(|o| o.colour.is_extra())
    });
    place(rng, &prompt)
}

/// One or two objects (two with probability 1 − [`ONE_OBJECT_FRACTION`]) in `colours`, the
/// rest redrawn until `accept` takes it.
fn random_prompt_of<R: Rng + ?Sized>(
    rng: &mut R,
    colours: &[Colour],
    accept: impl Fn(&Prompt) -> bool,
) -> Prompt {
    let one = rng.random_bool(ONE_OBJECT_FRACTION);
    loop {
        let first = random_spec(rng, colours, None);
        let prompt = if one {
            Prompt::One(first)
        } else {
            let relation = Relation::ALL[rng.random_range(0..Relation::ALL.len())];
            Prompt::Two(
                first,
                relation,
                random_spec(rng, colours, Some(first.colour)),
            )
        };
        if accept(&prompt) {
            return prompt;
        }
    }
}

fn random_spec<R: Rng + ?Sized>(
    rng: &mut R,
    colours: &[Colour],
    other_than: Option<Colour>,
) -> ObjectSpec {
    let colours: Vec<Colour> = colours
        .iter()
        .copied()
        .filter(|&c| Some(c) != other_than)
        .collect();
    ObjectSpec {
        colour: colours[rng.random_range(0..colours.len())],
        shape: Shape::ALL[rng.random_range(0..Shape::ALL.len())],
    }
}

/// A random scene the policy allows: [`random_prompt`], then a random placement as
/// [`random_scene_for`] makes.
pub fn random_scene<R: Rng + ?Sized>(rng: &mut R, held_out: HeldOut) -> Scene {
    let prompt = random_prompt(rng, held_out);
    place(rng, &prompt)
}

/// A random placement of a prompt's objects: sizes uniform in their range, then positions
/// uniform among those that keep the conventions (drawn by rejection, a few dozen tries for a
/// pair). Refuses two objects of one colour, which no scene holds (and [`Prompt`]'s parser
/// refuses too).
pub fn random_scene_for<R: Rng + ?Sized>(rng: &mut R, prompt: &Prompt) -> Result<Scene> {
    if let Prompt::Two(a, _, b) = prompt
        && a.colour == b.colour
    {
        return Err(ShapesError::Scene(
            "the two objects must have different colours",
        ));
    }
    Ok(place(rng, prompt))
}

/// [`random_scene_for`] for a prompt whose two objects (if two) differ in colour.
fn place<R: Rng + ?Sized>(rng: &mut R, prompt: &Prompt) -> Scene {
    match *prompt {
        Prompt::One(spec) => {
            let size = rng.random_range(ONE_OBJECT_SIZES);
            let object = random_object(rng, spec, size);
            Scene {
                objects: vec![object],
                relation: None,
            }
        }
        Prompt::Two(a, relation, b) => {
            let sizes = (
                rng.random_range(TWO_OBJECT_SIZES),
                rng.random_range(TWO_OBJECT_SIZES),
            );
            // Every pair of sizes fits (22 + 2 + 22 < 64 along, 6 across), so this ends.
            loop {
                let first = random_object(rng, a, sizes.0);
                let second = random_object(rng, b, sizes.1);
                if two_problem(&first, relation, &second).is_none() {
                    return Scene {
                        objects: vec![first, second],
                        relation: Some(relation),
                    };
                }
            }
        }
    }
}

/// An object of `size` anywhere fully inside the image.
fn random_object<R: Rng + ?Sized>(rng: &mut R, spec: ObjectSpec, size: u32) -> Object {
    Object {
        colour: spec.colour,
        shape: spec.shape,
        left: rng.random_range(0..=IMAGE_SIZE - size),
        top: rng.random_range(0..=IMAGE_SIZE - size),
        size,
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    fn object(shape: Shape, size: u32) -> Object {
        Object {
            colour: Colour::Red,
            shape,
            left: 0,
            top: 0,
            size,
        }
    }

    /// Each shape fills its whole box's extent: size = bounding-box side.
    #[test]
    fn shapes_span_their_box() {
        for size in 14..=30 {
            for shape in Shape::ALL {
                let o = object(shape, size);
                let (mut x0, mut y0, mut x1, mut y1) = (u32::MAX, u32::MAX, 0, 0);
                for y in 0..size {
                    for x in 0..size {
                        if o.covers(x, y) {
                            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
                        }
                    }
                }
                assert_eq!(
                    (x0, y0, x1 + 1, y1 + 1),
                    (0, 0, size, size),
                    "{shape} {size}"
                );
            }
            // The triangle's apex is in the middle of the top row, its base the whole bottom.
            let t = object(Shape::Triangle, size);
            let top: Vec<u32> = (0..size).filter(|&x| t.covers(x, 0)).collect();
            assert!(top.len() == 1 + (size % 2 == 0) as usize, "{size}: {top:?}");
            assert_eq!(top[0] + top[top.len() - 1] + 1, size);
            assert!((0..size).all(|x| t.covers(x, size - 1)));
        }
    }

    #[test]
    fn random_scenes_keep_the_conventions() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut ones = 0;
        for _ in 0..2000 {
            let scene = random_scene(&mut rng, HeldOut::Exclude);
            assert!(!is_held_out(&scene), "{}", scene.caption());
            // The constructors accept what the generator made.
            let rebuilt = match (scene.objects(), scene.relation()) {
                ([a], None) => Scene::one(*a),
                ([a, b], Some(r)) => Scene::two(*a, r, *b),
                _ => panic!("a scene of {} objects", scene.objects().len()),
            };
            assert_eq!(rebuilt.unwrap(), scene);
            ones += usize::from(scene.objects().len() == 1);
            // Exact palette fills only.
            let palette: Vec<[u8; 3]> = Colour::ALL.iter().map(|c| c.rgb()).collect();
            assert!(
                scene
                    .render()
                    .pixels()
                    .all(|p| p.0 == BACKGROUND || palette.contains(&p.0))
            );
        }
        assert!(
            (700..900).contains(&ones),
            "{ones} one-object scenes of 2000"
        );
        for _ in 0..200 {
            assert!(is_held_out(&random_scene(&mut rng, HeldOut::Only)));
        }
    }

    #[test]
    fn constructors_refuse_broken_conventions() {
        let at = |colour, left, top, size| Object {
            colour,
            shape: Shape::Square,
            left,
            top,
            size,
        };
        use Colour::{Green, Red};
        assert!(Scene::one(at(Red, 0, 0, 20)).is_ok());
        assert!(Scene::one(at(Red, 0, 0, 19)).is_err());
        assert!(Scene::one(at(Red, 40, 0, 25)).is_err());
        // 18 px apart along y, aligned across.
        assert!(Scene::two(at(Red, 10, 10, 16), Relation::Above, at(Green, 10, 28, 16)).is_ok());
        assert!(Scene::two(at(Red, 10, 10, 16), Relation::Below, at(Green, 10, 28, 16)).is_err());
        assert!(Scene::two(at(Red, 10, 10, 16), Relation::Above, at(Red, 10, 28, 16)).is_err());
        // Touching boxes (no gap), too far across, too close along.
        assert!(Scene::two(at(Red, 10, 10, 18), Relation::Above, at(Green, 10, 28, 18)).is_err());
        assert!(Scene::two(at(Red, 10, 10, 16), Relation::Above, at(Green, 17, 28, 16)).is_err());
        assert!(Scene::two(at(Red, 10, 10, 14), Relation::LeftOf, at(Green, 25, 10, 14)).is_err());
        assert!(Scene::two(at(Red, 10, 10, 14), Relation::LeftOf, at(Green, 26, 10, 14)).is_ok());
        assert!(
            Scene::two(
                at(Red, 26, 10, 14),
                Relation::RightOf,
                at(Green, 10, 10, 14)
            )
            .is_ok()
        );
    }
}
