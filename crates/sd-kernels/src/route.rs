//! Typed routes from a generic backend's tensors to a concrete backend's.
//!
//! The models are generic over `B: Backend`, while a fused kernel works on one backend's own
//! buffers (Flex's `FlexTensor`, or the inner backend of `Autodiff<I>`). Rust has no
//! specialisation, so the layers ask at run time whether `B` is that backend. [`SameType`] is
//! the answer as a value: it exists only when two types are one, and then converts between
//! them both ways without `unsafe` and without a conversion that can fail (the check happens
//! once, when the route is built, through `Any`'s safe downcast of two function pointers).

use std::any::Any;

/// Proof that `S` and `T` are the same type, with the identity conversions between them.
pub struct SameType<S, T> {
    to: fn(S) -> T,
    back: fn(T) -> S,
}

// Manual impls: the derives would ask `S: Clone` and `T: Clone`, but only function pointers
// are stored.
impl<S, T> Clone for SameType<S, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<S, T> Copy for SameType<S, T> {}

impl<S: 'static, T: 'static> SameType<S, T> {
    /// The route when `S` and `T` are the same type; `None` otherwise.
    pub fn check() -> Option<Self> {
        let to: Box<dyn Any> = Box::new(std::convert::identity::<S> as fn(S) -> S);
        let back: Box<dyn Any> = Box::new(std::convert::identity::<T> as fn(T) -> T);
        Some(Self {
            to: *to.downcast::<fn(S) -> T>().ok()?,
            back: *back.downcast::<fn(T) -> S>().ok()?,
        })
    }
}

impl<S, T> SameType<S, T> {
    /// `value` as a `T` (it is one).
    pub fn to(self, value: S) -> T {
        (self.to)(value)
    }

    /// `value` as an `S` (it is one).
    pub fn back(self, value: T) -> S {
        (self.back)(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_exists_only_between_equal_types() {
        let same = SameType::<Vec<f32>, Vec<f32>>::check().expect("equal types");
        assert_eq!(same.back(same.to(vec![1.0, 2.0])), vec![1.0, 2.0]);
        assert!(SameType::<Vec<f32>, Vec<f64>>::check().is_none());
        assert!(SameType::<u32, i32>::check().is_none());
    }
}
